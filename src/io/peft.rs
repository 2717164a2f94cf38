//! PEFT's adapter format: `adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor
//! names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), so that
//! `PeftModel.from_pretrained` loads what we write and we load what PEFT writes.

use crate::backend::Backend;
use crate::config::{LoraConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::model::lora::{Lora, LoraPair, Proj};
use crate::model::weights::{write_atomic, write_safetensors, HostTensor, SafetensorsSource, SaveDtype};
use serde_json::{json, Value};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The `adapter_config.json` PEFT writes for a LoRA adapter.
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null
    })
}

/// Writes the adapter into `dir` (created if needed); each file atomically.
pub fn save_adapter<B: Backend>(
    be: &B,
    lora: &Lora<B>,
    model: &ModelConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::new();
    for (name, buf) in lora.named_params() {
        let data = be.download(buf);
        let is_a = name.ends_with("lora_A.weight");
        let proj = Proj::ALL
            .into_iter()
            .find(|p| name.contains(&format!(".{}.", p.name())))
            .ok_or_else(|| Error::tensor(&name, "names no Llama projection"))?;
        let (out, inp) = proj.shape(model);
        let shape = if is_a { vec![lora.cfg.r, inp] } else { vec![out, lora.cfg.r] };
        tensors.push((name, HostTensor { shape, data }));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, SaveDtype::F32, Some(meta))?;
    let text = serde_json::to_string_pretty(&adapter_config_json(&lora.cfg, base_model)).expect("json");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Reads `adapter_config.json` into a [`LoraConfig`].
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let bad = |m: String| Error::format(&path, m);
    if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad(format!(
            "peft_type is {}; only LORA adapters are supported",
            v.get("peft_type").unwrap_or(&Value::Null)
        )));
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(bad("DoRA adapters are not supported".into()));
    }
    if let Some(bias) = v.get("bias").and_then(Value::as_str) {
        if bias != "none" {
            return Err(bad(format!("bias = {bias:?}: Llama projections have no bias, only \"none\" is meaningful")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
            return Err(bad(format!("`{key}` (per-module ranks) is not supported")));
        }
    }
    let r = v.get("r").and_then(Value::as_u64).ok_or_else(|| bad("missing integer `r`".into()))? as usize;
    let alpha = v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| bad("missing `lora_alpha`".into()))?;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        Some(Value::String(s)) if s == "all-linear" => vec!["all-linear".into()],
        other => return Err(bad(format!("`target_modules` must be a list of module names, got {other:?}"))),
    };
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let cfg = LoraConfig {
        r,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target_modules: vec![],
    }
    .with_targets(&refs)
    .map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// Loads an adapter written by PEFT (or by us) for a model of shape `model`. Each tensor's shape is
/// checked against the config's rank before anything of that size is allocated, so a corrupt `r`
/// is an error, not an allocation the machine cannot make.
pub fn load_adapter<B: Backend>(be: &B, model: &ModelConfig, dir: &Path) -> Result<Lora<B>> {
    let cfg = read_adapter_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let st = SafetensorsSource::open_file(&path)?;
    let mut seen = 0usize;
    let mut layers = Vec::with_capacity(model.num_hidden_layers);
    for l in 0..model.num_hidden_layers {
        let mut layer: [Option<LoraPair<B>>; 7] = Default::default();
        for p in Proj::ALL {
            if !cfg.targets(p.name()) {
                continue;
            }
            let base = format!("base_model.model.model.layers.{l}.{}", p.hf_path());
            let (out, inp) = p.shape(model);
            let read = |suffix: &str, shape: [usize; 2]| -> Result<B::Buf> {
                // PEFT may or may not keep the adapter name ("default") in saved keys.
                let plain = format!("{base}.{suffix}.weight");
                let named = format!("{base}.{suffix}.default.weight");
                let name = if st.has_tensor(&plain) { plain } else { named };
                let t = st.read(&name)?;
                if t.shape != shape {
                    return Err(Error::tensor(
                        &name,
                        format!("{}: shape {:?}, expected {shape:?}", path.display(), t.shape),
                    ));
                }
                Ok(be.upload(&t.data))
            };
            layer[p as usize] = Some(LoraPair { a: read("lora_A", [cfg.r, inp])?, b: read("lora_B", [out, cfg.r])? });
            seen += 2;
        }
        layers.push(layer);
    }
    let lora = Lora { cfg, layers };
    let total = st.num_tensors();
    if total != seen {
        return Err(Error::format(
            &path,
            format!("holds {total} tensors but the config's target modules account for {seen}: extra or unsupported modules"),
        ));
    }
    Ok(lora)
}
