//! Reading and writing Hugging Face weight files: safetensors (single or sharded with
//! `model.safetensors.index.json`), memory-mapped, in f32/f16/bf16. Every error names the file and,
//! where there is one, the tensor.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tensor on the host, converted to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Anything the model can pull named tensors from (a safetensors directory, a GGUF file).
pub trait WeightSource {
    /// Where the weights come from, for messages.
    fn describe(&self) -> String;
    fn config(&self) -> &ModelConfig;
    fn has(&self, name: &str) -> bool;
    /// The tensor `name` (Hugging Face naming), converted to f32.
    fn tensor(&self, name: &str) -> Result<HostTensor>;
}

/// A memory-mapped safetensors checkpoint, possibly split into shards.
pub struct SafetensorsSource {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read; a concurrent writer would be the user's error, as with any mmap.
    unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

fn st_error(path: &Path, e: safetensors::SafeTensorError) -> Error {
    use safetensors::SafeTensorError as E;
    let msg = match e {
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets outside the file (truncated?)"),
        E::MetadataIncompleteBuffer => {
            "tensor data does not fill the file: it is truncated or has trailing bytes".into()
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => "the safetensors header is truncated".into(),
        E::TensorInvalidInfo => "a tensor's shape and dtype disagree with its data offsets".into(),
        other => format!("not a valid safetensors file: {other:?}"),
    };
    Error::format(path, msg)
}

impl SafetensorsSource {
    /// Opens a Hugging Face model directory: `config.json` plus `model.safetensors` or shards listed
    /// in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let mut shard_names: Vec<String> = Vec::new();
        let mut declared: BTreeMap<String, String> = BTreeMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "missing `weight_map` object"))?;
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| Error::format(&index_path, format!("`weight_map.{name}` is not a file name")))?;
                if !shard_names.iter().any(|s| s == file) {
                    shard_names.push(file.to_string());
                }
                declared.insert(name.clone(), file.to_string());
            }
        } else if dir.join("model.safetensors").exists() {
            shard_names.push("model.safetensors".into());
        } else {
            return Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in this directory"));
        }
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let mmap = map_file(&path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| st_error(&path, e))?;
            for n in st.names() {
                index.insert(n.to_string(), i);
            }
            files.push((path, mmap));
        }
        for (name, file) in &declared {
            match index.get(name) {
                Some(&i) if files[i].0.file_name().and_then(|f| f.to_str()) == Some(file.as_str()) => {}
                _ => {
                    return Err(Error::format(
                        &index_path,
                        format!("tensor `{name}` is listed in shard {file} but that shard does not hold it"),
                    ))
                }
            }
        }
        Ok(SafetensorsSource { dir: dir.to_path_buf(), config, files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// Opens one safetensors file on its own (no `config.json`), e.g. an adapter or optimizer state.
    pub fn open_file(path: &Path) -> Result<TensorFile> {
        let mmap = map_file(path)?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| st_error(path, e))?;
        let names = st.names().into_iter().cloned().collect();
        Ok(TensorFile { path: path.to_path_buf(), mmap, names })
    }
}

/// One memory-mapped safetensors file.
pub struct TensorFile {
    path: PathBuf,
    mmap: Mmap,
    names: Vec<String>,
}

impl TensorFile {
    pub fn has_tensor(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
    pub fn num_tensors(&self) -> usize {
        self.names.len()
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        read_tensor(&self.path, &self.mmap, name)
    }
}

fn read_tensor(path: &Path, mmap: &Mmap, name: &str) -> Result<HostTensor> {
    let st = SafeTensors::deserialize(mmap).map_err(|e| st_error(path, e))?;
    let view = st.tensor(name).map_err(|_| Error::tensor(name, format!("not found in {}", path.display())))?;
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(Error::tensor(
                name,
                format!("{}: dtype {other:?} is not supported (f32, f16, bf16)", path.display()),
            ))
        }
    };
    Ok(HostTensor { shape: view.shape().to_vec(), data })
}

impl WeightSource for SafetensorsSource {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let &i =
            self.index.get(name).ok_or_else(|| Error::tensor(name, format!("not found in {}", self.dir.display())))?;
        let (path, mmap) = &self.files[i];
        read_tensor(path, mmap, name)
    }
}

/// Storage type for written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
    BF16,
}

impl SaveDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "fp32" | "f32" => Some(SaveDtype::F32),
            "float16" | "fp16" | "f16" => Some(SaveDtype::F16),
            "bfloat16" | "bf16" => Some(SaveDtype::BF16),
            _ => None,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::BF16 => "bfloat16",
        }
    }
    fn encode(self, data: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            SaveDtype::F32 => (Dtype::F32, data.iter().flat_map(|x| x.to_le_bytes()).collect()),
            SaveDtype::F16 => (Dtype::F16, data.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()),
            SaveDtype::BF16 => (Dtype::BF16, data.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        }
    }
}

/// Writes `tensors` to one safetensors file, atomically (a temporary file renamed into place).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: SaveDtype,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dt, bytes) = dtype.encode(&t.data);
            (n.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let mut views = Vec::with_capacity(encoded.len());
    for (n, dt, shape, bytes) in &encoded {
        let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
            .map_err(|e| Error::tensor(n, format!("cannot be written: {e:?}")))?;
        views.push((n.clone(), view));
    }
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, &metadata, &tmp).map_err(|e| Error::format(&tmp, format!("{e:?}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A temporary name for `path` in the same directory (so that renaming it onto `path` is atomic),
/// unique to this call: the process id and a per-process count keep two writers of the same file
/// (two tests fetching one asset at once, two runs sharing a cache) out of each other's way.
pub fn tmp_path(path: &Path) -> PathBuf {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}-{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes `text` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two writers of one file get two temporary names, both beside it and ending in `.tmp`.
    #[test]
    fn temporary_names_are_unique_per_call_and_beside_the_file() {
        let path = Path::new("/cache/llama-tokenizer.js");
        let (a, b) = (tmp_path(path), tmp_path(path));
        assert_ne!(a, b);
        for t in [&a, &b] {
            assert_eq!(t.parent(), path.parent());
            let name = t.file_name().unwrap().to_string_lossy();
            assert!(name.starts_with("llama-tokenizer.js.") && name.ends_with(".tmp"), "{name}");
        }
    }
}
