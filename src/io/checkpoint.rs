//! Training checkpoints: `checkpoint-N/` holds the adapter (PEFT format), the AdamW state, and
//! `trainer_state.json` (step, data position, seeds, log history). A checkpoint is written into
//! `checkpoint-N.tmp/` and renamed into place, so an interrupted save never leaves a half-written
//! checkpoint and never touches the previous one.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::peft;
use crate::model::lora::Lora;
use crate::model::weights::{write_atomic, write_safetensors, HostTensor, SafetensorsSource, SaveDtype};
use crate::optim::AdamW;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: usize,
    pub max_steps: usize,
    /// Epoch of the next micro-batch, and its index within that epoch's order.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub seed: u64,
    /// Steps skipped for a non-finite loss or gradient, in a row (resets on a good step).
    pub bad_steps_in_a_row: usize,
    pub skipped_steps: usize,
    pub log_history: Vec<serde_json::Value>,
}

/// Saves a checkpoint of step `state.global_step` under `output_dir`; returns its directory.
#[allow(clippy::too_many_arguments)]
pub fn save<B: Backend>(
    be: &B,
    output_dir: &Path,
    model: &ModelConfig,
    base_model: &str,
    lora: &Lora<B>,
    opt: &AdamW<B>,
    state: &TrainerState,
    args_json: &serde_json::Value,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.global_step);
    let final_dir = output_dir.join(&name);
    let tmp = output_dir.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    peft::save_adapter(be, lora, model, base_model, &tmp)?;
    let mut tensors = Vec::new();
    for (i, (pname, _)) in lora.named_params().iter().enumerate() {
        let (m, v) = opt.state_of(be, i);
        tensors.push((format!("{pname}.exp_avg"), HostTensor { shape: vec![m.len()], data: m }));
        tensors.push((format!("{pname}.exp_avg_sq"), HostTensor { shape: vec![v.len()], data: v }));
    }
    write_safetensors(&tmp.join(OPTIMIZER_FILE), &tensors, SaveDtype::F32, None)?;
    let mut st = serde_json::to_value(state).expect("state serializes");
    st["optimizer_step"] = serde_json::json!(opt.step);
    write_atomic(&tmp.join(STATE_FILE), serde_json::to_string_pretty(&st).expect("json").as_bytes())?;
    write_atomic(&tmp.join("training_args.json"), serde_json::to_string_pretty(args_json).expect("json").as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

/// Checkpoint directories under `output_dir`, oldest step first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Deletes the oldest checkpoints so that at most `limit` remain.
pub fn rotate(output_dir: &Path, limit: usize) -> Result<()> {
    let all = list(output_dir);
    if all.len() > limit {
        for (_, dir) in &all[..all.len() - limit] {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    Ok(())
}

/// Loads the adapter, optimizer state and trainer state of a checkpoint; the optimizer state goes
/// to host memory when `paged_chunk` is given.
pub fn load<B: Backend>(
    be: &B,
    dir: &Path,
    model: &ModelConfig,
    paged_chunk: Option<usize>,
) -> Result<(Lora<B>, AdamW<B>, TrainerState)> {
    let lora = peft::load_adapter(be, model, dir)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&state_path, format!("not valid JSON: {e}")))?;
    let state: TrainerState =
        serde_json::from_value(v.clone()).map_err(|e| Error::format(&state_path, format!("bad trainer state: {e}")))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let f = SafetensorsSource::open_file(&opt_path)?;
    let mut opt = match paged_chunk {
        Some(chunk) => AdamW::new_paged(be, &lora, Default::default(), chunk),
        None => AdamW::new(be, &lora, Default::default()),
    };
    for (i, (pname, buf)) in lora.named_params().iter().enumerate() {
        let n = be.buf_len(buf);
        let read = |suffix: &str| -> Result<Vec<f32>> {
            let name = format!("{pname}.{suffix}");
            let t = f.read(&name)?;
            if t.data.len() != n {
                return Err(Error::tensor(
                    &name,
                    format!("{}: {} values, expected {n}", opt_path.display(), t.data.len()),
                ));
            }
            Ok(t.data)
        };
        let (m, v) = (read("exp_avg")?, read("exp_avg_sq")?);
        opt.set_state(be, i, &m, &v);
    }
    opt.step = v.get("optimizer_step").and_then(|s| s.as_u64()).unwrap_or(state.global_step as u64) as u32;
    Ok((lora, opt, state))
}
