//! Opening a model by what the user typed: a Hugging Face directory, a GGUF file, or the name of a
//! model that ships in a registry package.

use crate::assets;
use crate::backend::Backend;
use crate::config::QuantConfig;
use crate::error::{Error, Result};
use crate::model::gguf::{GgufSource, MetaValue};
use crate::model::llama::Llama;
use crate::model::weights::{SafetensorsSource, WeightSource};
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// Names accepted in place of a path.
pub const KNOWN_MODELS: [&str; 1] = ["smollm2-135m-instruct"];

/// Where a model's weights live, opened.
pub enum ModelFiles {
    HfDir(Box<SafetensorsSource>),
    Gguf(Box<GgufSource>),
}

impl ModelFiles {
    pub fn source(&self) -> &dyn WeightSource {
        match self {
            ModelFiles::HfDir(s) => s.as_ref(),
            ModelFiles::Gguf(g) => g.as_ref(),
        }
    }
}

/// Resolves a model name to a path (fetching a known package-shipped model).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if spec.eq_ignore_ascii_case("smollm2-135m-instruct") {
        return assets::fetch(&assets::SMOLLM2_135M_INSTRUCT);
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        return Err(Error::Other(format!(
            "model {spec:?}: no such file or directory (give a Hugging Face model directory, a .gguf file, or one of {KNOWN_MODELS:?})"
        )));
    }
    Ok(p)
}

/// Opens the weights and tokenizer of `spec`.
pub fn open(spec: &str) -> Result<(ModelFiles, Tokenizer)> {
    let path = resolve(spec)?;
    if path.is_dir() {
        for f in ["config.json", "tokenizer.json"] {
            if !path.join(f).exists() {
                return Err(Error::format(&path, format!("model directory has no {f}")));
            }
        }
        let src = SafetensorsSource::open(&path)?;
        let tok = Tokenizer::from_dir(&path)?;
        Ok((ModelFiles::HfDir(Box::new(src)), tok))
    } else {
        let g = GgufSource::open(&path)?;
        let tok = gguf_tokenizer(&g)?;
        Ok((ModelFiles::Gguf(Box::new(g)), tok))
    }
}

/// The tokenizer stored in a GGUF file, with its special tokens and chat template.
pub fn gguf_tokenizer(g: &GgufSource) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_json(g.tokenizer_json()?).map_err(|e| Error::format(&g.file.path, e.to_string()))?;
    let token = |key: &str| -> Option<String> {
        let id = g.file.meta.get(key).and_then(MetaValue::as_u64)? as u32;
        tok.id_to_token(id)
    };
    let (bos, eos, pad) = (
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
        token("tokenizer.ggml.padding_token_id"),
    );
    (tok.bos_token, tok.eos_token, tok.pad_token) = (bos, eos, pad);
    tok.chat_template = g.chat_template();
    Ok(tok)
}

/// Loads the model onto `be`, quantizing projections when `quant` is given.
pub fn load_model<B: Backend>(
    be: &B,
    files: &ModelFiles,
    quant: Option<QuantConfig>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Llama<B>> {
    Llama::load_with_progress(be, files.source(), quant, progress)
}

/// True if `p` looks like a PEFT adapter directory.
pub fn is_adapter_dir(p: &Path) -> bool {
    p.join(crate::io::peft::CONFIG_FILE).exists()
}
