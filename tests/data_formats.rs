//! The data formats a user brings (JSONL, JSON, parquet; `text`, `messages`, `prompt`/`completion`,
//! alpaca columns), labels as transformers/TRL compute them (no double BOS, EOS trained, prompts
//! masked when asked), and clear errors for bad rows.

mod common;

use llamatune::backend::IGNORE_INDEX;
use llamatune::data::format::{render, RenderOptions, RowFormat};
use llamatune::data::read_records;
use llamatune::data::tokenize::tokenize_sample;
use llamatune::tokenizer::Tokenizer;
use llamatune::train::data::load_train_data;
use llamatune::train::TrainConfig;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

fn tok() -> Tokenizer {
    let mut t = Tokenizer::from_json(common::tokenizer_json()).unwrap();
    t.bos_token = Some("<s>".into());
    t.eos_token = Some("</s>".into());
    t
}

fn cfg(data: &Path) -> TrainConfig {
    TrainConfig {
        model: "unused".into(),
        dataset: data.display().to_string(),
        max_seq_length: 256,
        ..TrainConfig::default()
    }
}

fn write_lines(path: &Path, rows: &[serde_json::Value]) {
    let s: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, s).unwrap();
}

#[test]
fn text_rows_no_double_bos_and_eos_is_a_trained_label() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.jsonl");
    write_lines(&p, &[json!({"text": "<s>[INST] hi [/INST] yo </s>"}), json!({"text": "plain text without markers"})]);
    let (data, report) = load_train_data(&cfg(&p), &tok()).unwrap();
    assert_eq!(report.format, "Text { field: \"text\" }");
    let a = &data.train.samples[0];
    assert_eq!(a.input_ids[0], common::BOS);
    assert_ne!(a.input_ids[1], common::BOS, "no double <s>");
    assert_eq!(*a.input_ids.last().unwrap(), common::EOS);
    assert_eq!(*a.labels.last().unwrap(), common::EOS as i32, "EOS is trained");
    let ids_as_labels: Vec<i32> = a.input_ids.iter().map(|&i| i as i32).collect();
    assert_eq!(a.labels, ids_as_labels, "text rows train on every token, as labels = input_ids in transformers");
    let b = &data.train.samples[1];
    assert_eq!(b.input_ids[0], common::BOS, "BOS added when the text lacks it");
    assert_eq!(*b.input_ids.last().unwrap(), common::EOS, "EOS appended when missing");
    assert_eq!(*b.labels.last().unwrap(), common::EOS as i32);
    // EOS stays trained even when the pad token is EOS.
    assert_eq!(data.pad_id, common::EOS);
}

#[test]
fn json_array_and_parquet_read_like_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let rows = [json!({"text": "first row"}), json!({"text": "second row"})];
    let j = d.path().join("d.json");
    std::fs::write(&j, serde_json::to_string(&rows).unwrap()).unwrap();
    let l = d.path().join("d.jsonl");
    write_lines(&l, &rows);
    let pq = d.path().join("d.parquet");
    write_parquet_text(&pq, &["first row", "second row"]);
    let a = read_records(&l, false).unwrap().rows;
    assert_eq!(read_records(&j, false).unwrap().rows, a);
    let p = read_records(&pq, false).unwrap().rows;
    assert_eq!(
        p.iter().map(|r| r.fields.clone()).collect::<Vec<_>>(),
        a.iter().map(|r| r.fields.clone()).collect::<Vec<_>>()
    );
}

fn write_parquet_text(path: &Path, texts: &[&str]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type("message schema { REQUIRED BYTE_ARRAY text (UTF8); }").unwrap(),
    );
    let f = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(f, schema, Arc::new(WriterProperties::builder().build())).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let vals: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(*t)).collect();
    col.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn messages_prompt_completion_and_alpaca() {
    let d = tempfile::tempdir().unwrap();
    let t = tok();
    let path = d.path().join("x.jsonl");
    let rec = |v: serde_json::Value| llamatune::data::Record { line: 1, fields: v.as_object().unwrap().clone() };

    let m = rec(json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}));
    let fmt = RowFormat::detect(&m, "text", &path).unwrap();
    assert_eq!(fmt, RowFormat::Messages);
    let all = render(&m, &fmt, &t, &RenderOptions::default(), &path).unwrap();
    assert_eq!(all.text(), "<s>[INST] Hi [/INST] Hello </s>");
    let only = render(&m, &fmt, &t, &RenderOptions { completion_only: true, response_template: None }, &path).unwrap();
    assert_eq!(only.text(), all.text());
    assert_eq!(only.pieces.iter().filter(|p| p.1).map(|p| p.0.as_str()).collect::<String>(), " Hello </s>");
    let (ts, _) = tokenize_sample(&only, &t, 256).unwrap();
    let trained: Vec<u32> =
        ts.input_ids.iter().zip(&ts.labels).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&i, _)| i).collect();
    assert_eq!(t.decode(&trained, false).unwrap(), " Hello </s>");

    let pc = rec(json!({"prompt": "Q: 2+2?", "completion": " A: 4"}));
    let fmt = RowFormat::detect(&pc, "text", &path).unwrap();
    assert!(fmt.default_completion_only());
    let s = render(&pc, &fmt, &t, &RenderOptions { completion_only: true, response_template: None }, &path).unwrap();
    let (ts, _) = tokenize_sample(&s, &t, 256).unwrap();
    let trained: Vec<u32> =
        ts.input_ids.iter().zip(&ts.labels).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&i, _)| i).collect();
    assert_eq!(t.decode(&trained, false).unwrap(), " A: 4</s>");

    let al = rec(json!({"instruction": "Add", "input": "2 and 3", "output": "5"}));
    let fmt = RowFormat::detect(&al, "text", &path).unwrap();
    assert_eq!(fmt, RowFormat::Alpaca);
    assert_eq!(
        render(&al, &fmt, &t, &RenderOptions::default(), &path).unwrap().text(),
        "<s>[INST] Add\n\n2 and 3 [/INST] 5 </s>"
    );
}

#[test]
fn bad_rows_empty_data_and_truncation_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.jsonl");
    std::fs::write(&p, "{\"text\": \"ok\"}\n{not json\n{\"text\": \"ok too\"}\n").unwrap();
    let e = load_train_data(&cfg(&p), &tok()).err().unwrap().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains("not valid JSON"), "{e}");
    let (data, report) = load_train_data(&TrainConfig { skip_bad_rows: true, ..cfg(&p) }, &tok()).unwrap();
    assert_eq!((report.skipped_bad_rows, data.train.samples.len()), (1, 2));

    let p = d.path().join("missing.jsonl");
    write_lines(&p, &[json!({"text": "ok"}), json!({"txt": "wrong column"})]);
    let e = load_train_data(&cfg(&p), &tok()).err().unwrap().to_string();
    assert!(e.contains("missing.jsonl") && e.contains("line 2") && e.contains("`text`"), "{e}");

    let p = d.path().join("empty.jsonl");
    std::fs::write(&p, "\n\n").unwrap();
    let e = load_train_data(&cfg(&p), &tok()).err().unwrap().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");

    let p = d.path().join("long.jsonl");
    write_lines(&p, &[json!({"text": "x".repeat(500)}), json!({"text": "short"})]);
    let (data, report) = load_train_data(&TrainConfig { max_seq_length: 64, ..cfg(&p) }, &tok()).unwrap();
    assert_eq!(report.truncated, 1);
    assert!(data.train.samples.iter().all(|s| s.input_ids.len() <= 64));

    let p = d.path().join("cols.jsonl");
    write_lines(&p, &[json!({"question": "?"})]);
    let e = load_train_data(&cfg(&p), &tok()).err().unwrap().to_string();
    assert!(e.contains("cannot tell the format") && e.contains("question"), "{e}");
}
