//! A model's tokenizer, from the GGUF file's own metadata (`tokenizer.ggml.*`) or from a
//! `tokenizer.json` beside it, built with the Hugging Face `tokenizers` crate.
//!
//! GGUF carries two vocabulary kinds in practice: `llama` (SentencePiece: scored pieces,
//! `▁` for spaces, byte fallback) and `gpt2` (byte-level BPE with merges). Both become the
//! pipeline `tokenizers` itself uses for those families.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::RuntimeError;

/// GGUF token type of control tokens (`<s>`, `</s>`, chat markers).
const CONTROL: i32 = 3;

/// A tokenizer and the special tokens generation needs.
pub struct ModelTokenizer {
    inner: Tokenizer,
    /// Prepended to a raw prompt when the model asks for it.
    pub bos: Option<u32>,
    /// Generation stops at any of these.
    pub eos: Vec<u32>,
    /// Text of the BOS token, for chat templates.
    pub bos_text: String,
    /// Text of the EOS token.
    pub eos_text: String,
    add_bos: bool,
}

impl ModelTokenizer {
    /// The tokenizer of the model at `path`: `tokenizer.json` beside it when present, else
    /// the file's metadata.
    pub fn load(path: &Path, md: &HashMap<String, Value>) -> Result<Self, RuntimeError> {
        let beside = path.with_file_name("tokenizer.json");
        let inner = if beside.exists() {
            Tokenizer::from_file(&beside)
                .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", beside.display())))?
        } else {
            from_metadata(md)?
        };
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let text = |id: Option<u32>| {
            id.and_then(|i| inner.id_to_token(i))
                .unwrap_or_default()
                .to_string()
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut eos: Vec<u32> = eos_id.into_iter().collect();
        // Chat models end a turn with their own marker as often as with EOS.
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(i) = inner.token_to_id(marker)
                && !eos.contains(&i)
            {
                eos.push(i);
            }
        }
        Ok(ModelTokenizer {
            bos_text: text(bos),
            eos_text: text(eos_id),
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(bos.is_some()),
            bos,
            eos,
            inner,
        })
    }

    /// Token ids of `text`; `raw` prompts get the BOS token when the model wants one, chat
    /// prompts carry it in their template.
    pub fn encode(&self, text: &str, raw: bool) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if raw && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, RuntimeError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, RuntimeError> {
    let missing = || RuntimeError::Tokenizer(format!("the model has no {key}"));
    md.get(key)
        .ok_or_else(missing)?
        .to_vec()
        .map_err(|_| missing())?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| missing()))
        .collect()
}

fn numbers<T>(md: &HashMap<String, Value>, key: &str, f: impl Fn(&Value) -> Option<T>) -> Vec<T> {
    md.get(key)
        .and_then(|v| v.to_vec().ok())
        .map(|vs| vs.iter().filter_map(&f).collect())
        .unwrap_or_default()
}

fn tk(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Tokenizer(e.to_string())
}

/// The `tokenizers` pipeline for the vocabulary in `tokenizer.ggml.*`.
fn from_metadata(md: &HashMap<String, Value>) -> Result<Tokenizer, RuntimeError> {
    let kind = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map_or("", String::as_str);
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let types = numbers(md, "tokenizer.ggml.token_type", |v| v.to_i32().ok());
    let mut tokenizer = match kind {
        "llama" => {
            let scores = numbers(md, "tokenizer.ggml.scores", |v| v.to_f32().ok());
            let unk = md
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(|v| v.to_u32().ok())
                .unwrap_or(0);
            let vocab = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), f64::from(scores.get(i).copied().unwrap_or(0.0))))
                .collect();
            let model = Unigram::from(vocab, Some(unk as usize), true).map_err(tk)?;
            let mut t = Tokenizer::new(model);
            t.with_normalizer(Some(NormalizerWrapper::Sequence(
                tokenizers::normalizers::Sequence::new(vec![
                    Prepend::new("▁".into()).into(),
                    Replace::new(" ", "▁").map_err(tk)?.into(),
                ]),
            )));
            t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
                Replace::new("▁", " ").map_err(tk)?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
                Strip::new(' ', 1, 0).into(),
            ]))));
            t
        }
        "gpt2" => {
            let merges = strings(md, "tokenizer.ggml.merges")?
                .into_iter()
                .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
                .collect();
            let vocab: tokenizers::models::bpe::Vocab = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect();
            let model = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .build()
                .map_err(tk)?;
            let mut t = Tokenizer::new(model);
            t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            t.with_decoder(Some(ByteLevel::new(false, true, true)));
            t
        }
        other => {
            return Err(RuntimeError::Tokenizer(format!(
                "tokenizer.ggml.model {other:?} is not supported (llama or gpt2); put a tokenizer.json beside the model"
            )));
        }
    };
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, ty)| **ty == CONTROL)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}
