//! Compiles every `kernels/*.cu` to a fatbin (SASS for each arch in `CUDA_ARCHS`, default `sm_90a`)
//! when the `cuda` feature is on, and generates the table that embeds them. Without the feature it
//! does nothing, so the crate builds on machines with no CUDA at all.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ["NVCC", "CUDA_HOME", "CUDA_ARCHS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "the `cuda` feature needs nvcc: set NVCC or CUDA_HOME, put nvcc on PATH, or run \
             scripts/install-nvcc.sh (installs nvcc 13.0 from PyPI into .venv-cuda) and export NVCC=<the path it prints>"
        )
    });
    let archs = std::env::var("CUDA_ARCHS").unwrap_or_else(|_| "sm_90a".into());
    // The fused 4-bit matmul (kernels/nf4_gemm.cu) uses wgmma, which only sm_90a code has.
    println!("cargo::rustc-check-cfg=cfg(wgmma_kernels)");
    if archs.split(',').any(|a| a.trim() == "sm_90a") {
        println!("cargo:rustc-cfg=wgmma_kernels");
    }
    let mut gencode = Vec::new();
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let num = a.strip_prefix("sm_").unwrap_or_else(|| panic!("CUDA_ARCHS entry {a:?} must look like sm_90a"));
        if !["90a", "90", "89", "80", "86"].contains(&num) {
            panic!("CUDA_ARCHS entry {a:?} is not supported (sm_90a, sm_90, sm_89, sm_86, sm_80)");
        }
        gencode.push(format!("-gencode=arch=compute_{num},code=sm_{num}"));
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    kernels.sort();
    let mut table = String::from(
        "/// `(module name, fatbin)` for every `kernels/*.cu`.\npub const MODULES: &[(&str, &[u8])] = &[\n",
    );
    for k in &kernels {
        let stem = k.file_stem().and_then(|s| s.to_str()).expect("kernel file name");
        let fatbin = out.join(format!("{stem}.fatbin"));
        let output = Command::new(&nvcc)
            .args(&gencode)
            .args(["-O3", "-std=c++17", "-Xptxas=-warn-spills", "-fatbin", "-o"])
            .arg(&fatbin)
            .arg(k)
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
        let messages = String::from_utf8_lossy(&output.stderr);
        eprint!("{messages}");
        if !output.status.success() {
            panic!("nvcc failed on {} ({}):\n{messages}", k.display(), output.status);
        }
        // The compiler front end's warnings (`file(line): warning #N-D: ...`) fail the build: cargo
        // shows a build script's output only when it fails, so they would otherwise go unseen (a
        // stray `#pragma unroll` once did). ptxas's spill reports stay informational.
        let front_end: Vec<&str> = messages.lines().filter(|l| l.contains(": warning #")).collect();
        if !front_end.is_empty() {
            panic!("nvcc warned on {}:\n{}", k.display(), front_end.join("\n"));
        }
        table.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", fatbin.display().to_string()));
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("write kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    let venv =
        std::fs::read_dir(".venv-cuda/lib").ok()?.flatten().next()?.path().join("site-packages/nvidia/cu13/bin/nvcc");
    if venv.exists() {
        return std::fs::canonicalize(venv).ok();
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("nvcc")).find(|p| p.exists())
}
