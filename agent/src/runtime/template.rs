//! Chat prompts: the model's own chat template (`tokenizer.chat_template`, Jinja, rendered
//! with minijinja as Hugging Face renders it), or ChatML when the model has none.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

use super::RuntimeError;

/// One chat message as templates see it.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`…
    pub role: String,
    /// The text.
    pub content: String,
}

/// Used when a model carries no template of its own.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`, or ChatML when `None`.
    pub fn new(source: Option<String>) -> Result<Self, RuntimeError> {
        let mut env = Environment::new();
        // Hugging Face templates call this to refuse a conversation they cannot render.
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_owned()))
            .map_err(|e| RuntimeError::Load(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env })
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, RuntimeError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| RuntimeError::Prompt(e.to_string()))?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| RuntimeError::Prompt(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_is_the_default_and_ends_at_the_assistant_turn() {
        let t = ChatTemplate::new(None).expect("compiles");
        let p = t
            .render(
                &[msg("system", "be brief"), msg("user", "hi")],
                "<s>",
                "</s>",
            )
            .expect("renders");
        assert_eq!(
            p,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_model_template_sees_bos_and_can_refuse() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(Some(src.into())).expect("compiles");
        assert_eq!(
            t.render(&[msg("user", "hi")], "<s>", "</s>")
                .expect("renders"),
            "<s>[user] hi\n"
        );
        let err = t
            .render(&[msg("tool", "x")], "<s>", "</s>")
            .expect_err("refused");
        assert!(err.to_string().contains("no tools"), "{err}");
    }
}
