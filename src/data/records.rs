//! Reading dataset rows from JSONL, a JSON array, or parquet (what a hub dataset download holds).
//! Each row keeps its line (or row) number so that later errors can point at it.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// One dataset row and where it came from (1-based line for JSONL, row for JSON/parquet).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub line: usize,
    pub fields: Map<String, Value>,
}

/// Rows read, and how many bad rows were skipped (only when `skip_bad_rows`).
pub struct Records {
    pub rows: Vec<Record>,
    pub skipped: usize,
}

/// Reads every row of `path`, choosing the reader by extension (`.jsonl`, `.json`, `.parquet`).
pub fn read_records(path: &Path, skip_bad_rows: bool) -> Result<Records> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let records = match ext.as_str() {
        "jsonl" | "ndjson" => read_jsonl(path, skip_bad_rows)?,
        "json" => read_json(path, skip_bad_rows)?,
        "parquet" => read_parquet(path)?,
        _ => {
            return Err(Error::format(path, "unknown dataset format: expected a .jsonl, .json or .parquet file"));
        }
    };
    if records.rows.is_empty() {
        return Err(Error::format(path, "the dataset is empty"));
    }
    Ok(records)
}

fn read_jsonl(path: &Path, skip: bool) -> Result<Records> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => rows.push(Record { line: i + 1, fields }),
            Ok(_) if skip => skipped += 1,
            Ok(_) => return Err(Error::format(path, format!("line {}: not a JSON object", i + 1))),
            Err(_) if skip => skipped += 1,
            Err(e) => return Err(Error::format(path, format!("line {}: not valid JSON ({e})", i + 1))),
        }
    }
    Ok(Records { rows, skipped })
}

fn read_json(path: &Path, skip: bool) -> Result<Records> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let arr = match v {
        Value::Array(a) => a,
        _ => return Err(Error::format(path, "expected a JSON array of row objects")),
    };
    let mut rows = Vec::new();
    let mut skipped = 0;
    for (i, v) in arr.into_iter().enumerate() {
        match v {
            Value::Object(fields) => rows.push(Record { line: i + 1, fields }),
            _ if skip => skipped += 1,
            _ => return Err(Error::format(path, format!("row {}: not a JSON object", i + 1))),
        }
    }
    Ok(Records { rows, skipped })
}

fn read_parquet(path: &Path) -> Result<Records> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        SerializedFileReader::new(f).map_err(|e| Error::format(path, format!("not a readable parquet file: {e}")))?;
    let iter = reader.get_row_iter(None).map_err(|e| Error::format(path, format!("cannot read rows: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| Error::format(path, format!("row {}: {e}", i + 1)))?;
        match row.to_json_value() {
            Value::Object(fields) => rows.push(Record { line: i + 1, fields }),
            _ => return Err(Error::format(path, format!("row {}: not a record", i + 1))),
        }
    }
    Ok(Records { rows, skipped: 0 })
}

/// Writes rows as JSONL, atomically.
pub fn write_jsonl(path: &Path, rows: &[Map<String, Value>]) -> Result<()> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(r).expect("json"));
        out.push('\n');
    }
    crate::model::weights::write_atomic(path, out.as_bytes())
}
