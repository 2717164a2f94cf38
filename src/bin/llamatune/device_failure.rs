//! Device failures as error messages. The backend's ops have no error channel (a failed launch or copy
//! panics with "CUDA <op> failed: <driver error>"), so the command line turns those panics into an
//! `error:` line that says what happened and what to try, instead of a panic message and a backtrace
//! hint. The process still exits non-zero; checkpoints already written stay (they are atomic).

use std::any::Any;

/// Installs the panic hook: device failures print [`explain`]'s message; any other panic keeps the
/// default report (it is a bug).
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| match explain(&payload_text(info.payload())) {
        Some(message) => eprintln!("error: {message}"),
        None => default(info),
    }));
}

fn payload_text(payload: &dyn Any) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::new()
    }
}

/// The message for a panic raised by a failed device call, or None for any other panic.
pub fn explain(panic_text: &str) -> Option<String> {
    let what = panic_text.strip_prefix("CUDA ")?;
    let hint = if what.contains("OUT_OF_MEMORY") {
        "the GPU ran out of memory: try a smaller --per-device-train-batch-size or --max-seq-length, \
         keep --gradient-checkpointing on (with lower --gradient-checkpointing-keep-mlp and \
         --gradient-checkpointing-keep-attention), or stop other processes using the GPU; a training \
         run stopped this way resumes with --resume-from-checkpoint latest"
    } else {
        "the GPU or its driver reported a failure; `nvidia-smi` shows the device's state, and \
         --device cpu runs without it"
    };
    Some(format!("{what}\n  {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_gets_advice_and_other_panics_stay_panics() {
        let oom = explain("CUDA alloc failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").unwrap();
        assert!(oom.starts_with("alloc failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY"), "{oom}");
        assert!(oom.contains("ran out of memory") && oom.contains("--per-device-train-batch-size"), "{oom}");
        assert!(oom.contains("--gradient-checkpointing-keep-mlp") && oom.contains("keep-attention"), "{oom}");
        let launch =
            explain("CUDA rmsnorm_f32 failed: DriverError(CUDA_ERROR_LAUNCH_FAILED, \"unspecified launch failure\")")
                .unwrap();
        assert!(launch.contains("nvidia-smi") && !launch.contains("ran out of memory"), "{launch}");
        assert_eq!(explain("index out of bounds: the len is 3 but the index is 7"), None);
        assert_eq!(payload_text(&"CUDA x failed: y"), "CUDA x failed: y");
        assert_eq!(payload_text(&String::from("s")), "s");
        assert_eq!(payload_text(&7u32), "");
    }
}
