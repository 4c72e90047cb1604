//! Tiny llama-family GGUF models with seeded random weights and a SentencePiece-style
//! vocabulary in the file's metadata: real files for the embedded runtime, made on the spot
//! for tests and the dev stack's demo (nothing is downloaded).

use std::path::Path;

pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Words the vocabulary knows whole, so that generated text reads as words.
const WORDS: &[&str] = &[
    "the", "a", "device", "cloud", "model", "edge", "answer", "fast", "private", "data", "route",
    "token", "version", "stable", "canary", "fleet", "is", "on", "in", "runs", "and", "to", "of",
    "with", "policy", "request", "local", "remote", "small", "large", "hello", "world", "yes",
    "no", "maybe", "today", "network", "battery", "cost", "latency",
];

/// What to make.
#[derive(Clone, Copy, Debug)]
pub struct TinyModel {
    /// Seeds every weight: the same seed is the same model.
    pub seed: u64,
    /// Storage of the matrices: F32, Q8_0, Q4_0…
    pub dtype: GgmlDType,
    /// Perturbs every matrix by noise as large as the weights: a broken build of the same
    /// model, for tests that must tell good variants from bad.
    pub damaged: bool,
    /// Hidden size (a multiple of 32 for the block quantizations).
    pub dim: usize,
    /// Transformer blocks.
    pub layers: usize,
}

impl TinyModel {
    /// A 2-layer, 64-wide model.
    pub fn new(seed: u64, dtype: GgmlDType) -> Self {
        TinyModel {
            seed,
            dtype,
            damaged: false,
            dim: 64,
            layers: 2,
        }
    }

    /// The same model, damaged.
    pub fn damaged(mut self) -> Self {
        self.damaged = true;
        self
    }
}

/// Tokens of the vocabulary: specials, the 256 byte-fallback pieces, then words.
fn vocabulary() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec![
        "<unk>".to_owned(),
        "<s>".to_owned(),
        "</s>".to_owned(),
        "<|im_start|>".to_owned(),
        "<|im_end|>".to_owned(),
    ];
    let mut types = vec![2, 3, 3, 3, 3];
    let mut scores = vec![0.0; tokens.len()];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(-1000.0);
    }
    for (i, w) in WORDS.iter().enumerate() {
        tokens.push(format!("▁{w}"));
        types.push(1);
        scores.push(-(i as f32) / 100.0 - 1.0);
    }
    (tokens, scores, types)
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn matrix(
    rng: &mut StdRng,
    noise: &mut StdRng,
    damaged: bool,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let scale = 1.0 / (cols as f32).sqrt() * 1.7;
    (0..rows * cols)
        .map(|_| {
            let w = rng.random_range(-scale..scale);
            // Drawn either way, so the good and the damaged model share every weight.
            let n = noise.random_range(-scale..scale);
            if damaged { w + n } else { w }
        })
        .collect()
}

/// Writes the model to `path`.
pub fn write(path: &Path, m: TinyModel) -> candle_core::Result<()> {
    std::fs::write(path, bytes(m)?)?;
    Ok(())
}

/// The model's GGUF file, in memory; the same model is the same bytes at every call.
pub fn bytes(m: TinyModel) -> candle_core::Result<Vec<u8>> {
    let (tokens, scores, types) = vocabulary();
    let vocab = tokens.len();
    let (dim, ffn, heads) = (m.dim, m.dim * 2, 4usize);
    let mut rng = StdRng::seed_from_u64(m.seed);
    let mut noise = StdRng::seed_from_u64(m.seed ^ 0x5eed);
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // `quiet_rows`: rows before it are scaled down.
    let mut mat = |name: String,
                   rows: usize,
                   cols: usize,
                   dtype: GgmlDType,
                   quiet_rows: usize|
     -> candle_core::Result<()> {
        let mut data = matrix(&mut rng, &mut noise, m.damaged, rows, cols);
        for w in &mut data[..quiet_rows * cols] {
            *w *= 0.05;
        }
        let t = Tensor::from_vec(data, (rows, cols), &dev)?;
        tensors.push((name, QTensor::quantize(&t, dtype)?));
        Ok(())
    };
    mat("token_embd.weight".into(), vocab, dim, GgmlDType::F32, 0)?;
    // Byte pieces and specials get small output rows, so greedy answers are words and a
    // random model does not end its turn at once.
    mat(
        "output.weight".into(),
        vocab,
        dim,
        m.dtype,
        vocab - WORDS.len(),
    )?;
    for l in 0..m.layers {
        for w in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            mat(format!("blk.{l}.{w}.weight"), dim, dim, m.dtype, 0)?;
        }
        mat(format!("blk.{l}.ffn_gate.weight"), ffn, dim, m.dtype, 0)?;
        mat(format!("blk.{l}.ffn_up.weight"), ffn, dim, m.dtype, 0)?;
        mat(format!("blk.{l}.ffn_down.weight"), dim, ffn, m.dtype, 0)?;
    }
    let ones = |name: String| -> candle_core::Result<(String, QTensor)> {
        let t = Tensor::ones(dim, candle_core::DType::F32, &dev)?;
        Ok((name, QTensor::quantize(&t, GgmlDType::F32)?))
    };
    tensors.push(ones("output_norm.weight".into())?);
    for l in 0..m.layers {
        tensors.push(ones(format!("blk.{l}.attn_norm.weight"))?);
        tensors.push(ones(format!("blk.{l}.ffn_norm.weight"))?);
    }
    let u32v = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "general.name",
            Value::String(format!("edgewise-tiny-{}", m.seed)),
        ),
        ("llama.context_length", u32v(1024)),
        ("llama.embedding_length", u32v(dim)),
        ("llama.feed_forward_length", u32v(ffn)),
        ("llama.block_count", u32v(m.layers)),
        ("llama.attention.head_count", u32v(heads)),
        ("llama.attention.head_count_kv", u32v(heads)),
        ("llama.rope.dimension_count", u32v(dim / heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id", u32v(0)),
        ("tokenizer.ggml.bos_token_id", u32v(1)),
        ("tokenizer.ggml.eos_token_id", u32v(2)),
        (
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}
