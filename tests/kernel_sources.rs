//! Checks on the CUDA sources that need no GPU: every kernel waits for the kernels it depends on
//! before it touches their data. Decoding's CUDA graph launches each of our kernels while the one
//! before it may still run (programmatic dependent launch, src/backend/cuda/graph.rs), which is only
//! correct if the kernel calls `grid_dependency_wait()` first (kernels/common.cuh). A kernel that
//! forgot it would read half-written activations in decoding only, and only sometimes. And
//! decoding's per-layer kernels let the next kernel launch early, which only speed shows.

use std::fs;
use std::path::Path;

/// Device functions that call `grid_dependency_wait()` themselves (the GEMVs after reading only
/// weights), so a kernel whose body calls one of them waits too (checked below against their
/// definitions).
const WAITING_HELPERS: &[&str] = &["gemv_rows", "gemv_many_block", "decode_inputs_at", "read_floor"];

/// The body of the function whose opening brace is at or after `from`: the text between its braces.
fn body_after(src: &str, from: usize) -> &str {
    // The first brace that is not a default argument's `{}`.
    let open = from
        + src[from..].match_indices('{').map(|(i, _)| i).find(|&i| !src[from + i..].starts_with("{}")).expect("a body");
    let mut depth = 0usize;
    for (i, ch) in src[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &src[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after byte {from}")
}

/// The text before the first `return` or the end, where the wait must come.
fn before_first_return(body: &str) -> &str {
    body.find("return").map_or(body, |i| &body[..i])
}

/// The body of the function or macro `name` defined in `sources`: the first `name(` after a space
/// on a line that declares a function (`void`) or a macro (`#define`).
fn definition<'a>(sources: &'a [(String, String)], name: &str) -> &'a str {
    sources
        .iter()
        .find_map(|(_, src)| {
            src.match_indices(&format!(" {name}("))
                .map(|(at, _)| at)
                .find(|&at| {
                    let line = &src[src[..at].rfind('\n').map_or(0, |i| i + 1)..=at];
                    line.contains("void ") || line.starts_with("#define")
                })
                .map(|at| body_after(src, at))
        })
        .unwrap_or_else(|| panic!("no definition of {name} in kernels/"))
}

fn sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .expect("kernels/")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read_to_string(&p).expect("read")))
        .collect()
}

#[test]
fn every_kernel_waits_for_its_inputs_before_using_them() {
    let sources = sources();
    let mut kernels = 0;
    let mut missing = Vec::new();
    for (file, src) in &sources {
        for (at, _) in src.match_indices("__global__") {
            kernels += 1;
            let body = before_first_return(body_after(src, at));
            let waits = body.contains("grid_dependency_wait()")
                || WAITING_HELPERS.iter().any(|h| body.contains(&format!("{h}<")) || body.contains(&format!("{h}(")));
            if !waits {
                let line = src[..at].lines().count();
                missing.push(format!("{file}:{line}"));
            }
        }
    }
    assert!(kernels > 50, "found only {kernels} kernels: did the sources move?");
    assert!(
        missing.is_empty(),
        "kernels that do not call grid_dependency_wait() before using their inputs: {missing:?}"
    );
}

#[test]
fn the_waiting_helpers_wait() {
    let sources = sources();
    for helper in WAITING_HELPERS {
        let body = definition(&sources, helper);
        let waits = body.contains("grid_dependency_wait()")
            || WAITING_HELPERS.iter().any(|h| h != helper && body.contains(&format!("{h}<")));
        assert!(waits, "{helper} does not call grid_dependency_wait()");
    }
}

/// Where decoding's per-layer kernels let the next kernel launch early (`allow_dependent_launch()`,
/// kernels/common.cuh): the 4-bit GEMVs (`gemv_rows`), the LoRA f32 products, RoPE into the cache,
/// the attention, the add + norms, and the step's inputs and greedy choice. A kernel that lost its
/// trigger would still give the same values, only slower: the next kernel would launch once its
/// every block had exited (the triggers gave +8.9% decoding on the H200, session 36).
const TRIGGERING: &[&str] = &[
    "gemv_rows",
    "gemv_f32_row",
    "gemv_f32_long_row",
    "rope_cache_f32",
    "attention_fwd_f32",
    "ADD_RMSNORM",
    "decode_inputs_at",
    "argmax_f32",
];

#[test]
fn decoding_kernels_let_the_next_kernel_launch_early() {
    let sources = sources();
    for name in TRIGGERING {
        let body = definition(&sources, name);
        assert!(body.contains("allow_dependent_launch()"), "{name} no longer calls allow_dependent_launch()");
    }
}
