//! TensorBoard event files: TFRecord framing (length, masked CRC32C of the length, payload, masked
//! CRC32C of the payload) around hand-encoded `Event` protobufs holding scalar summaries.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC32C (Castagnoli), bitwise-table implementation.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, ((field << 3) | wire) as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    tag(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    tag(&mut e, 2, 0);
    varint(&mut e, step as u64);
    body(&mut e);
    e
}

/// Writes scalar summaries to `events.out.tfevents.<time>.<host>` in a run directory.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now() as u64));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file };
        let first = event(now(), 0, |e| bytes_field(e, 3, b"brain.Event:2"));
        w.write_record(&first)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&rec).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// One `Summary` with `tag → value` scalars at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let rec = event(now(), step as i64, |e| {
            let mut summary = Vec::new();
            for (t, v) in values {
                let mut val = Vec::new();
                bytes_field(&mut val, 1, t.as_bytes());
                tag(&mut val, 2, 5);
                val.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &val);
            }
            bytes_field(e, 5, &summary);
        });
        self.write_record(&rec)
    }
}

/// A scalar read back from an event file: `(step, tag, value)`.
pub type Scalar = (i64, String, f32);

/// Reads every scalar from an event file, checking both CRCs of every record.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: &str| Error::format(path, m.to_string());
    let mut pos = 0;
    let mut out = Vec::new();
    let mut saw_version = false;
    while pos < data.len() {
        if pos + 12 > data.len() {
            return Err(bad("truncated record header"));
        }
        let len_bytes = &data[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8")) as usize;
        if u32::from_le_bytes(data[pos + 8..pos + 12].try_into().expect("4")) != masked_crc(len_bytes) {
            return Err(bad("length CRC mismatch"));
        }
        let body = data.get(pos + 12..pos + 12 + len).ok_or_else(|| bad("truncated record"))?;
        let crc = data.get(pos + 12 + len..pos + 16 + len).ok_or_else(|| bad("truncated record CRC"))?;
        if u32::from_le_bytes(crc.try_into().expect("4")) != masked_crc(body) {
            return Err(bad("data CRC mismatch"));
        }
        pos += 16 + len;
        let mut step = 0i64;
        for (field, val) in fields(body).map_err(&bad)? {
            match (field, val) {
                (2, Field::Varint(v)) => step = v as i64,
                (3, Field::Bytes(_)) => saw_version = true,
                (5, Field::Bytes(summary)) => {
                    for (f, v) in fields(summary).map_err(&bad)? {
                        if let (1, Field::Bytes(value)) = (f, v) {
                            let mut t = String::new();
                            let mut x = f32::NAN;
                            for (vf, vv) in fields(value).map_err(&bad)? {
                                match (vf, vv) {
                                    (1, Field::Bytes(b)) => t = String::from_utf8_lossy(b).into_owned(),
                                    (2, Field::Fixed32(b)) => x = f32::from_le_bytes(b),
                                    _ => {}
                                }
                            }
                            out.push((step, t, x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if !saw_version {
        return Err(bad("no file_version event"));
    }
    Ok(out)
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// Decodes the top-level fields of a protobuf message.
fn fields(mut b: &[u8]) -> std::result::Result<Vec<(u32, Field<'_>)>, &'static str> {
    fn read_varint(b: &mut &[u8]) -> std::result::Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let field = (key >> 3) as u32;
        let f = match key & 7 {
            0 => Field::Varint(read_varint(&mut b)?),
            1 => {
                b = b.get(8..).ok_or("truncated fixed64")?;
                Field::Fixed64
            }
            5 => {
                let v: [u8; 4] = b.get(..4).ok_or("truncated fixed32")?.try_into().expect("4");
                b = &b[4..];
                Field::Fixed32(v)
            }
            2 => {
                let n = read_varint(&mut b)? as usize;
                let v = b.get(..n).ok_or("truncated bytes")?;
                b = &b[n..];
                Field::Bytes(v)
            }
            _ => return Err("unsupported wire type"),
        };
        out.push((field, f));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn event_file_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path()).unwrap();
        w.scalars(10, &[("train/loss", 2.5), ("train/learning_rate", 2e-4)]).unwrap();
        w.scalars(20, &[("train/loss", 1.25)]).unwrap();
        let s = read_scalars(w.path()).unwrap();
        assert_eq!(
            s,
            vec![
                (10, "train/loss".into(), 2.5),
                (10, "train/learning_rate".into(), 2e-4),
                (20, "train/loss".into(), 1.25)
            ]
        );
        // A flipped byte is detected.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_scalars(w.path()).is_err());
    }
}
