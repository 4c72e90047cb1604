//! The embedded runtime: llama-family GGUF models on the CPU through candle's quantized
//! llama (F32, F16, Q8_0, Q4_0/Q4_1, K-quants), greedy or sampled decoding.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as Sampler};
use candle_transformers::models::quantized_llama::ModelWeights;

use super::template::{ChatMessage, ChatTemplate};
use super::tokenizer::ModelTokenizer;
use super::{Finish, Prompt, RuntimeError, Sampling, Usage};

/// candle's quantized llama precomputes rotary tables for this many positions.
const MAX_POSITIONS: usize = 4096;

/// A loaded GGUF model. Weights are shared; each request decodes with its own KV cache.
pub struct GgufModel {
    weights: ModelWeights,
    tokenizer: ModelTokenizer,
    template: ChatTemplate,
    context: usize,
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Load(format!("{}: {e}", path.display()))
}

impl GgufModel {
    /// Reads the model at `path` (blocking: call it off the async threads).
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
        let mut file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| load_err(path, e))?;
        let md: HashMap<String, Value> = content.metadata.clone();
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(load_err(
                path,
                format!(
                    "architecture {arch:?} is not served by the embedded runtime (llama); configure an external runtime for it"
                ),
            ));
        }
        let context = md
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(MAX_POSITIONS, |c| (c as usize).min(MAX_POSITIONS));
        let tokenizer = ModelTokenizer::load(path, &md)?;
        let template = ChatTemplate::new(
            md.get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        )?;
        let weights = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .map_err(|e| load_err(path, e))?;
        Ok(GgufModel {
            weights,
            tokenizer,
            template,
            context,
        })
    }

    /// Token ids of a prompt.
    pub fn tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, RuntimeError> {
        match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true),
            Prompt::Chat(messages) => {
                let text = self.render(messages)?;
                self.tokenizer.encode(&text, false)
            }
        }
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String, RuntimeError> {
        self.template
            .render(messages, &self.tokenizer.bos_text, &self.tokenizer.eos_text)
    }

    /// Generates an answer, handing each new piece of text to `on_text`, which returns
    /// false to stop (the client went away). Blocking.
    pub fn generate(
        &self,
        prompt: &Prompt,
        sampling: &Sampling,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<(Usage, Finish), RuntimeError> {
        let prompt_ids = self.tokens(prompt)?;
        if prompt_ids.len() >= self.context {
            return Err(RuntimeError::ContextTooLong {
                tokens: prompt_ids.len(),
                context: self.context,
            });
        }
        let budget = sampling.max_tokens.min(self.context - prompt_ids.len());
        let mut weights = self.weights.clone();
        let mut sampler = LogitsProcessor::from_sampling(
            sampling.seed,
            match (sampling.temperature, sampling.top_p) {
                (t, _) if t <= 0.0 => Sampler::ArgMax,
                (temperature, Some(p)) if p < 1.0 => Sampler::TopP { p, temperature },
                (temperature, _) => Sampler::All { temperature },
            },
        );
        let gen_err = |e: candle_core::Error| RuntimeError::Generation(e.to_string());
        let mut out: Vec<u32> = Vec::with_capacity(budget);
        let mut emitted = String::new();
        let mut input = prompt_ids.clone();
        let mut finish = Finish::Length;
        while out.len() < budget {
            let pos = prompt_ids.len() + out.len() - input.len();
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .map_err(gen_err)?;
            let logits = weights
                .forward(&x, pos)
                .and_then(|l| l.squeeze(0))
                .map_err(gen_err)?;
            let next = sampler.sample(&logits).map_err(gen_err)?;
            if self.tokenizer.eos.contains(&next) {
                finish = Finish::Stop;
                break;
            }
            out.push(next);
            input = vec![next];
            // Decode everything so far and pass on only what is new and whole: a multi-byte
            // character can span tokens.
            let text = self.tokenizer.decode(&out)?;
            if text.ends_with('\u{fffd}') {
                continue;
            }
            let (text, stopped) = match sampling
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                Some(at) => (&text[..at], true),
                None => (text.as_str(), false),
            };
            if let Some(new) = text.get(emitted.len()..)
                && !new.is_empty()
            {
                if !on_text(new) {
                    finish = Finish::Cancelled;
                    break;
                }
                emitted.push_str(new);
            }
            if stopped {
                finish = Finish::Stop;
                break;
            }
        }
        Ok((
            Usage {
                prompt_tokens: prompt_ids.len(),
                completion_tokens: out.len(),
            },
            finish,
        ))
    }
}
