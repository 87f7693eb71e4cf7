//! Preference-pair data: the three layouts (ordering, ties, dual captions, soft labels, bad
//! records), preprocessing against Pillow / torchvision references, and the latent cache.
//! Parquet inputs and image references come from `tests/fixtures/gen_data.py`; JSONL and folder
//! inputs are written into temporary folders here.

mod common;

use std::cell::Cell;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{own_fixtures, IMAGE_ATOL};
use diffalign::data::{
    resize, BadRecordPolicy, DataFormat, DataSpec, LatentCache, LatentKey, Listing, PairDataset, PreferencePair,
    Preprocess, RecordLocation, Records, ResampleFilter,
};
use diffalign::rng::Rng;
use diffalign::Error;
use image::{Rgb, RgbImage};
use serde_json::Value;

/// Largest difference per channel between a decoded fixture colour and the generator's colour
/// (the JPEG images are solid colours at quality 95).
const COLOR_TOL: i32 = 6;

fn data_dir() -> PathBuf {
    own_fixtures().join("data")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(data_dir().join("pickapic_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn spec(format: DataFormat, path: impl Into<PathBuf>) -> DataSpec {
    DataSpec::new(format, path)
}

fn assert_color(img: &RgbImage, want: &Value, what: &str) {
    let p = img.get_pixel(img.width() / 2, img.height() / 2);
    for c in 0..3 {
        let w = want[c].as_i64().unwrap() as i32;
        assert!(
            (p[c] as i32 - w).abs() <= COLOR_TOL,
            "{what}: pixel {p:?}, expected {want}"
        );
    }
}

/// Checks `ds` against the generator's expected pairs, in order; the pair of row `corrupt` must
/// fail to decode instead.
fn assert_pairs(ds: &PairDataset, want: &Value, file: &str, corrupt: Option<i64>) {
    let want = want.as_array().unwrap();
    assert_eq!(ds.len(), want.len(), "pair count");
    for (i, w) in want.iter().enumerate() {
        if w["row"].as_i64() == corrupt {
            assert!(ds.get(i).is_err(), "pair {i} has a corrupt image");
            continue;
        }
        let p = ds.get(i).unwrap_or_else(|e| panic!("pair {i}: {e}"));
        assert_eq!(p.location.index as i64, w["row"].as_i64().unwrap(), "pair {i} row");
        assert!(
            p.location.file.ends_with(file),
            "pair {i} file {}",
            p.location.file.display()
        );
        assert_eq!(p.caption_w, w["caption_w"].as_str().unwrap(), "pair {i} caption_w");
        assert_eq!(p.caption_l, w["caption_l"].as_str().unwrap(), "pair {i} caption_l");
        assert_color(&p.image_w, &w["color_w"], &format!("pair {i} image_w"));
        assert_color(&p.image_l, &w["color_l"], &format!("pair {i} image_l"));
        match w["soft_label"].as_f64() {
            Some(s) => assert!((p.soft_label.unwrap() as f64 - s).abs() < 1e-6, "pair {i} soft label"),
            None => assert_eq!(p.soft_label, None, "pair {i} soft label"),
        }
    }
}

fn skipped_rows(ds: &PairDataset) -> Vec<usize> {
    ds.skipped().iter().map(|(l, _)| l.index).collect()
}

/// Position of the pair that came from `row`.
fn pair_of_row(ds: &PairDataset, want: &Value, row: i64) -> usize {
    want.as_array()
        .unwrap()
        .iter()
        .position(|w| w["row"].as_i64() == Some(row))
        .unwrap_or_else(|| panic!("row {row} not among the expected pairs of a dataset of {}", ds.len()))
}

// ----------------------------------------------------------------------------------------------
// pickapic

#[test]
fn pickapic_orders_winner_first_and_drops_ties() {
    let ds = PairDataset::open(&spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"))).unwrap();
    let exp = &expected()["pickapic_tiny.parquet"];
    assert_pairs(
        &ds,
        &exp["drop_ties"],
        "pickapic_tiny.parquet",
        exp["corrupt"]["row"].as_i64(),
    );
    let rows: Vec<usize> = exp["skipped_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(skipped_rows(&ds), rows);
    let reasons: Vec<&str> = ds.skipped().iter().map(|(_, r)| r.as_str()).collect();
    assert!(reasons[0].contains("label_0 is null"), "{reasons:?}");
    assert!(reasons[1].contains("must be 0, 0.5 or 1, got 0.25"), "{reasons:?}");
    assert!(reasons[2].contains("caption is null"), "{reasons:?}");
}

#[test]
fn pickapic_keeps_ties_image_0_first_when_asked() {
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"));
    s.drop_ties = false;
    let ds = PairDataset::open(&s).unwrap();
    let exp = &expected()["pickapic_tiny.parquet"];
    assert_pairs(
        &ds,
        &exp["keep_ties"],
        "pickapic_tiny.parquet",
        exp["corrupt"]["row"].as_i64(),
    );
}

#[test]
fn pickapic_corrupt_image_is_record_error_naming_row_and_column() {
    let ds = PairDataset::open(&spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"))).unwrap();
    let exp = &expected()["pickapic_tiny.parquet"];
    let i = pair_of_row(&ds, &exp["drop_ties"], exp["corrupt"]["row"].as_i64().unwrap());
    let err = ds.get(i).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::Record { file, index, reason } => {
            assert!(file.ends_with("pickapic_tiny.parquet"));
            assert_eq!(index, 3);
            assert!(reason.contains("jpg_1") && reason.contains("cannot decode"), "{reason}");
        }
        other => panic!("expected a record error, got {other}"),
    }
    assert!(msg.contains("pickapic_tiny.parquet: record 3: jpg_1"), "{msg}");
}

#[test]
fn pickapic_bad_record_policy_error_names_the_row() {
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"));
    s.bad_records = BadRecordPolicy::Error;
    let msg = PairDataset::open(&s).err().expect("row 5 has a null label").to_string();
    assert!(
        msg.contains("pickapic_tiny.parquet: record 5: label_0 is null"),
        "{msg}"
    );
}

#[test]
fn pickapic_dual_captions_move_with_images_and_soft_labels_are_read() {
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_dcpo.parquet"));
    s.dual_captions = true;
    s.columns.soft_label = Some("pickscore_prob".into());
    let ds = PairDataset::open(&s).unwrap();
    let exp = &expected()["pickapic_dcpo.parquet"];
    assert_pairs(&ds, &exp["dual_drop_ties"], "pickapic_dcpo.parquet", None);
    assert_eq!(skipped_rows(&ds), vec![3, 4]);
    assert!(ds.skipped()[0].1.contains("[0.5, 1]"), "{:?}", ds.skipped());
    assert!(ds.skipped()[1].1.contains("caption_1 is null"), "{:?}", ds.skipped());
}

#[test]
fn pickapic_single_caption_ignores_per_image_captions() {
    // Without dual captions the prompt column is used and caption_0/1 are not read, so row 4
    // (null caption_1) and row 3 (soft label column not requested) are usable.
    let ds = PairDataset::open(&spec(DataFormat::Pickapic, data_dir().join("pickapic_dcpo.parquet"))).unwrap();
    let rows: Vec<usize> = (0..ds.len()).map(|i| ds.get(i).unwrap().location.index).collect();
    assert_eq!(rows, vec![0, 1, 3, 4]);
    for i in 0..ds.len() {
        let p = ds.get(i).unwrap();
        assert_eq!(p.caption_w, format!("prompt of row {}", p.location.index));
        assert_eq!(p.caption_l, p.caption_w);
        assert_eq!(p.soft_label, None);
    }
    assert!(ds.skipped().is_empty());
}

#[test]
fn pickapic_missing_column_names_file_and_column() {
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"));
    s.columns.label_0 = "preference".into();
    let msg = PairDataset::open(&s).err().unwrap().to_string();
    assert!(
        msg.contains("pickapic_tiny.parquet") && msg.contains("column preference: not found"),
        "{msg}"
    );
    assert!(msg.contains("label_0"), "lists the file's columns: {msg}");

    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"));
    s.dual_captions = true;
    let msg = PairDataset::open(&s).err().unwrap().to_string();
    assert!(msg.contains("column caption_0: not found"), "{msg}");
}

#[test]
fn pickapic_wrong_type_names_file_row_and_column() {
    let s = spec(DataFormat::Pickapic, data_dir().join("pickapic_badtype.parquet"));
    let err = PairDataset::open(&s).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Record { index: 0, .. }), "{msg}");
    assert!(
        msg.contains("pickapic_badtype.parquet: record 0: column label_0: expected a number, got string"),
        "{msg}"
    );

    // An image column of the wrong type is caught from the schema.
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"));
    s.columns.jpg_1 = "label_1".into();
    let msg = PairDataset::open(&s).err().unwrap().to_string();
    assert!(msg.contains("column label_1: expected binary image bytes"), "{msg}");
}

#[test]
fn pickapic_unsupported_codec_is_named() {
    let s = spec(DataFormat::Pickapic, data_dir().join("pickapic_gzip.parquet"));
    let msg = PairDataset::open(&s).err().unwrap().to_string();
    assert!(msg.contains("pickapic_gzip.parquet") && msg.contains("GZIP"), "{msg}");
    assert!(msg.contains("uncompressed and snappy"), "{msg}");
}

#[test]
fn pickapic_shard_folder_is_read_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = data_dir().join("pickapic_tiny.parquet");
    std::fs::copy(&src, dir.path().join("train-00001.parquet")).unwrap();
    std::fs::copy(&src, dir.path().join("train-00000.parquet")).unwrap();
    std::fs::write(dir.path().join("README.md"), "not a shard").unwrap();
    let ds = PairDataset::open(&spec(DataFormat::Pickapic, dir.path())).unwrap();
    assert_eq!(ds.len(), 8);
    assert_eq!(ds.skipped().len(), 6);
    let files: Vec<String> = (0..ds.len())
        .map(|i| ds.get(i).map(|p| p.location.file).unwrap_or_else(|e| record_file(&e)))
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files[..4], ["train-00000.parquet"; 4]);
    assert_eq!(files[4..], ["train-00001.parquet"; 4]);

    // The limit stops the scan in the first shard.
    let mut s = spec(DataFormat::Pickapic, dir.path());
    s.limit = Some(3);
    let ds = PairDataset::open(&s).unwrap();
    assert_eq!(ds.len(), 3);
    assert!(ds.skipped().is_empty(), "rows after the limit are not scanned");

    let empty = tempfile::tempdir().unwrap();
    let msg = PairDataset::open(&spec(DataFormat::Pickapic, empty.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("*.parquet shards not found"), "{msg}");
}

fn record_file(e: &Error) -> PathBuf {
    match e {
        Error::Record { file, .. } => file.clone(),
        other => panic!("{other}"),
    }
}

#[test]
fn pickapic_any_access_order_gives_the_same_pairs() {
    // Readers are reused for later rows of a row group; backward and cross-group jumps, repeats
    // and concurrent readers must all see the same pairs.
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_dcpo.parquet"));
    s.drop_ties = false;
    s.dual_captions = true;
    let ds = PairDataset::open(&s).unwrap();
    let describe = |ds: &PairDataset, i: usize| {
        let p = ds.get(i).unwrap();
        (
            p.location.index,
            p.caption_w,
            p.caption_l,
            *p.image_w.get_pixel(0, 0),
            *p.image_l.get_pixel(0, 0),
        )
    };
    let fresh: Vec<_> = (0..ds.len())
        .map(|i| describe(&PairDataset::open(&s).unwrap(), i))
        .collect();
    for order in [vec![2, 0, 1, 1, 2, 0, 0], vec![0, 1, 2, 2, 1, 0]] {
        for i in order {
            assert_eq!(describe(&ds, i), fresh[i], "pair {i}");
        }
    }
    let tiny = PairDataset::open(&spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"))).unwrap();
    let rows = |ds: &PairDataset, order: &[usize]| {
        order
            .iter()
            .map(|&i| ds.get(i).map(|p| p.caption_w).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let want = rows(&tiny, &[0, 1, 2, 3]);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (tiny, want) = (&tiny, &want);
                scope.spawn(move || {
                    for k in 0..25 {
                        let order: Vec<usize> = (0..4).map(|j| (j * (t + 1) + k) % 4).collect();
                        let expect: Vec<String> = order.iter().map(|&i| want[i].clone()).collect();
                        assert_eq!(rows(tiny, &order), expect);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn pickapic_index_out_of_range_is_an_error() {
    let ds = PairDataset::open(&spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"))).unwrap();
    let err = ds.get(ds.len()).unwrap_err().to_string();
    assert!(
        err.contains(&format!("< {n}, got {n}", n = ds.len())),
        "the error should give the bound and the index: {err}"
    );
}

#[test]
fn data_spec_reads_recipe_table_with_defaults() {
    let s: DataSpec = toml::from_str(
        r#"
        format = "pickapic"
        path = "data/train"
        dual_captions = true
        [columns]
        soft_label = "pickscore_prob"
        caption_0 = "cap_a"
        "#,
    )
    .unwrap();
    assert_eq!(s.format, DataFormat::Pickapic);
    assert!(s.drop_ties && s.dual_captions);
    assert_eq!(s.bad_records, BadRecordPolicy::Skip);
    assert_eq!(s.columns.caption_0, "cap_a");
    assert_eq!(s.columns.caption_1, "caption_1");
    assert_eq!(s.columns.soft_label.as_deref(), Some("pickscore_prob"));
    assert_eq!(s.limit, None);

    let s: DataSpec = toml::from_str("format = \"jsonl\"\npath = \"p\"\nbad_records = \"error\"\nlimit = 5").unwrap();
    assert_eq!(
        (s.format, s.bad_records, s.limit),
        (DataFormat::Jsonl, BadRecordPolicy::Error, Some(5))
    );

    assert!(toml::from_str::<DataSpec>("format = \"folders\"\npath = \"p\"\nshuffle = true").is_err());
    assert!(toml::from_str::<DataSpec>("format = \"folders\"\npath = \"p\"\n[columns]\nimage = \"x\"").is_err());
    assert!(toml::from_str::<DataSpec>("format = \"csv\"\npath = \"p\"").is_err());
}

#[test]
fn missing_data_path_is_an_error() {
    let msg = PairDataset::open(&spec(DataFormat::Jsonl, "/nonexistent/pairs.jsonl"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("/nonexistent/pairs.jsonl: preference data not found"),
        "{msg}"
    );
}

// ----------------------------------------------------------------------------------------------
// jsonl and folders

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

fn save(img: &RgbImage, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// A JSONL folder: images `img/{i}_{w,l}.png` with colours `[i*40, 200, 0]` / `[i*40, 0, 200]`.
fn jsonl_fixture(lines: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4u8 {
        save(
            &solid(8, 6, [i * 40, 200, 0]),
            &dir.path().join(format!("img/{i}_w.png")),
        );
        save(
            &solid(8, 6, [i * 40, 0, 200]),
            &dir.path().join(format!("img/{i}_l.png")),
        );
    }
    std::fs::write(dir.path().join("pairs.jsonl"), lines.join("\n")).unwrap();
    dir
}

const JSONL_LINES: [&str; 7] = [
    r#"{"prompt": "p0", "chosen": "img/0_w.png", "rejected": "img/0_l.png", "extra": 1}"#,
    r#"{"prompt": "p1", "chosen": "img/1_w.png", "rejected": "img/1_l.png", "caption_chosen": "c1w", "caption_rejected": "c1l", "soft_label": 0.75}"#,
    r#"{"prompt": "p2", "chosen": "img/2_w.png", "rejected": "#,
    "",
    r#"{"prompt": "p4", "chosen": "img/9_w.png", "rejected": "img/2_l.png"}"#,
    r#"{"caption": "p5", "chosen": "img/3_w.png", "rejected": "img/3_l.png", "soft_label": 0.25}"#,
    r#"{"caption": "p6", "chosen": "img/3_w.png", "rejected": "img/3_l.png"}"#,
];

#[test]
fn jsonl_reads_pairs_and_skips_bad_lines() {
    let dir = jsonl_fixture(&JSONL_LINES);
    // The folder and the file path are the same source.
    for path in [dir.path().to_path_buf(), dir.path().join("pairs.jsonl")] {
        let ds = PairDataset::open(&spec(DataFormat::Jsonl, &path)).unwrap();
        assert_eq!(ds.len(), 3);
        let lines: Vec<usize> = (0..3).map(|i| ds.get(i).unwrap().location.index).collect();
        assert_eq!(lines, vec![0, 1, 6]);
        let p = ds.get(1).unwrap();
        assert_eq!((p.caption_w.as_str(), p.caption_l.as_str()), ("p1", "p1"));
        assert_eq!(p.soft_label, Some(0.75));
        assert_eq!(*p.image_w.get_pixel(0, 0), Rgb([40, 200, 0]));
        assert_eq!(*p.image_l.get_pixel(0, 0), Rgb([40, 0, 200]));
        assert_eq!(ds.get(2).unwrap().caption_w, "p6", "caption is an alias of prompt");
        assert_eq!(skipped_rows(&ds), vec![2, 4, 5]);
        let reasons: Vec<&str> = ds.skipped().iter().map(|(_, r)| r.as_str()).collect();
        assert!(reasons[0].contains("not a pair object"), "{reasons:?}");
        assert!(
            reasons[1].contains("chosen image") && reasons[1].contains("9_w.png"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("soft label must be in [0.5, 1]"), "{reasons:?}");
        assert!(ds.skipped()[0].0.file.ends_with("pairs.jsonl"));
    }
}

#[test]
fn jsonl_bad_line_is_record_error_with_line_index() {
    let dir = jsonl_fixture(&JSONL_LINES);
    let mut s = spec(DataFormat::Jsonl, dir.path());
    s.bad_records = BadRecordPolicy::Error;
    let err = PairDataset::open(&s).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Record { index: 2, .. }), "{msg}");
    assert!(msg.contains("pairs.jsonl: record 2: not a pair object"), "{msg}");
}

#[test]
fn jsonl_dual_captions_need_both_captions() {
    let dir = jsonl_fixture(&JSONL_LINES);
    let mut s = spec(DataFormat::Jsonl, dir.path());
    s.dual_captions = true;
    let ds = PairDataset::open(&s).unwrap();
    assert_eq!(ds.len(), 1);
    let p = ds.get(0).unwrap();
    assert_eq!(
        (p.caption_w.as_str(), p.caption_l.as_str(), p.location.index),
        ("c1w", "c1l", 1)
    );
    assert!(ds
        .skipped()
        .iter()
        .any(|(l, r)| l.index == 0 && r.contains("caption_chosen and caption_rejected")));
}

#[test]
fn jsonl_unreadable_image_is_record_error_at_get() {
    let dir = jsonl_fixture(&JSONL_LINES[..1]);
    std::fs::write(dir.path().join("img/0_l.png"), b"garbage").unwrap();
    let ds = PairDataset::open(&spec(DataFormat::Jsonl, dir.path())).unwrap();
    let msg = ds.get(0).unwrap_err().to_string();
    assert!(
        msg.contains("pairs.jsonl: record 0: rejected") && msg.contains("cannot decode"),
        "{msg}"
    );
}

fn folders_fixture(captions_name: &str, captions: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
        save(&solid(5, 7, [10 * i as u8, 100, 0]), &dir.path().join("w").join(name));
    }
    for (i, name) in ["a.png", "b.png", "d.png"].iter().enumerate() {
        save(&solid(5, 7, [10 * i as u8, 0, 100]), &dir.path().join("l").join(name));
    }
    std::fs::write(dir.path().join("w/.DS_Store"), b"x").unwrap();
    std::fs::write(dir.path().join(captions_name), captions).unwrap();
    dir
}

#[test]
fn folders_pair_matching_names_with_captions_txt() {
    let dir = folders_fixture(
        "captions.txt",
        "a.png\tan apple\nb.png\ta bee\nc.png\ta cat\nd.png\ta dog\n",
    );
    let ds = PairDataset::open(&spec(DataFormat::Folders, dir.path())).unwrap();
    assert_eq!(ds.len(), 2);
    let p = ds.get(1).unwrap();
    assert_eq!(p.caption_w, "a bee");
    assert_eq!(p.caption_l, "a bee");
    assert_eq!(*p.image_w.get_pixel(0, 0), Rgb([10, 100, 0]));
    assert_eq!(*p.image_l.get_pixel(0, 0), Rgb([10, 0, 100]));
    assert!(p.location.file.ends_with("w/b.png"));
    let skipped: Vec<(String, &str)> = ds
        .skipped()
        .iter()
        .map(|(l, r)| (l.file.file_name().unwrap().to_string_lossy().into_owned(), r.as_str()))
        .collect();
    assert_eq!(
        skipped,
        vec![
            ("c.png".into(), "l/c.png is missing"),
            ("d.png".into(), "w/d.png is missing")
        ]
    );

    let mut s = spec(DataFormat::Folders, dir.path());
    s.bad_records = BadRecordPolicy::Error;
    let msg = PairDataset::open(&s).err().unwrap().to_string();
    assert!(msg.contains("w/c.png: record 2: l/c.png is missing"), "{msg}");
}

#[test]
fn folders_captions_jsonl_bad_lines_and_missing_captions() {
    let captions =
        "{\"file\": \"a.png\", \"caption\": \"an apple\"}\nnot json\n{\"file\": \"a.png\", \"caption\": \"again\"}\n";
    let dir = folders_fixture("captions.jsonl", captions);
    let ds = PairDataset::open(&spec(DataFormat::Folders, dir.path())).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.get(0).unwrap().caption_w, "an apple");
    let reasons: Vec<String> = ds.skipped().iter().map(|(l, r)| format!("{l}: {r}")).collect();
    assert!(
        reasons[0].contains("captions.jsonl: record 1: expected {\"file\""),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("captions.jsonl: record 2: second caption for a.png"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no caption for b.png")),
        "{reasons:?}"
    );

    let mut s = spec(DataFormat::Folders, dir.path());
    s.dual_captions = true;
    assert!(PairDataset::open(&s)
        .err()
        .unwrap()
        .to_string()
        .contains("dual_captions"));
}

#[test]
fn fingerprint_follows_data_and_settings() {
    let dir = jsonl_fixture(&JSONL_LINES);
    let s = spec(DataFormat::Jsonl, dir.path());
    let a = PairDataset::open(&s).unwrap().fingerprint();
    assert_eq!(a.len(), 16);
    assert_eq!(a, PairDataset::open(&s).unwrap().fingerprint());
    let mut limited = s.clone();
    limited.limit = Some(2);
    assert_ne!(a, PairDataset::open(&limited).unwrap().fingerprint());
    std::fs::write(dir.path().join("pairs.jsonl"), JSONL_LINES[..2].join("\n")).unwrap();
    assert_ne!(a, PairDataset::open(&s).unwrap().fingerprint());
}

// ----------------------------------------------------------------------------------------------
// preprocessing

fn load_png(name: &str) -> RgbImage {
    image::open(data_dir().join(name)).unwrap().to_rgb8()
}

fn max_byte_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn resize_matches_pillow() {
    let src = load_png("resize_src.png");
    let cases = [
        ("resize_pil_29x16.png", ResampleFilter::Bilinear),
        ("resize_pil_13x7.png", ResampleFilter::Bilinear),
        ("resize_pil_61x29.png", ResampleFilter::Bilinear),
        ("resize_pil_37x11.png", ResampleFilter::Bilinear),
        ("resize_pil_20x20.png", ResampleFilter::Bilinear),
        ("resize_pil_bicubic_29x16.png", ResampleFilter::Bicubic),
        ("resize_pil_bicubic_45x31.png", ResampleFilter::Bicubic),
    ];
    for (name, filter) in cases {
        let want = load_png(name);
        let got = resize(&src, want.width(), want.height(), filter);
        let d = max_byte_diff(&got, &want);
        // Same algorithm as Pillow, so exact; the contract is within 2/255.
        assert!(d as f32 / 255.0 <= IMAGE_ATOL, "{name}: max difference {d}/255");
        assert_eq!(d, 0, "{name}: max difference {d}/255");
    }
}

fn preprocess(resolution: (usize, usize)) -> Preprocess {
    Preprocess {
        resolution,
        center_crop: true,
        random_flip: false,
        flip_pair_together: false,
        empty_caption_prob: 0.0,
    }
}

fn chw(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
    t.to_vec3::<f32>().unwrap()
}

#[test]
fn preprocess_matches_torchvision_resize_center_crop_normalize() {
    let src = load_png("resize_src.png");
    let want = load_png("pipeline_16.png");
    let p = preprocess((16, 16));
    let prepared = p.prepare(&src, &mut Rng::new(0), false).unwrap();
    assert_eq!(prepared.pixels.dims(), &[3, 16, 16]);
    assert_eq!(prepared.original_size, (20, 37));
    assert_eq!(prepared.resized_size, (16, 29));
    assert_eq!(prepared.crop_top_left, (0, 6), "round(6.5) is 6 with ties to even");
    let got = chw(&prepared.pixels);
    let mut worst = 0f32;
    for (x, y, px) in want.enumerate_pixels() {
        for (c, plane) in got.iter().enumerate() {
            let w = (px[c] as f32 / 255.0 - 0.5) / 0.5;
            worst = worst.max((plane[y as usize][x as usize] - w).abs());
        }
    }
    // [-1, 1] units: two bytes are 4/255.
    assert!(worst <= 2.0 * IMAGE_ATOL, "max difference {worst}");
    assert_eq!(worst, 0.0, "expected the same bytes as torchvision");
}

#[test]
fn preprocess_non_square_resolution_shapes_range_and_flip() {
    let src = load_png("resize_src.png"); // 37x20
    let p = preprocess((8, 12));
    assert_eq!(p.resized_size((20, 37)), (8, 14));
    let a = p.prepare(&src, &mut Rng::new(0), false).unwrap();
    assert_eq!(a.pixels.dims(), &[3, 8, 12]);
    assert_eq!(a.crop_top_left, (0, 1));
    let flipped = p.image(&src, &mut Rng::new(0), true).unwrap();
    let (a, f) = (chw(&a.pixels), chw(&flipped));
    for c in 0..3 {
        for y in 0..8 {
            for x in 0..12 {
                assert!((-1.0..=1.0).contains(&a[c][y][x]));
                assert_eq!(a[c][y][x], f[c][y][11 - x], "flip mirrors columns");
            }
        }
    }
    // A tall image: the width is the side that fits.
    let tall = solid(10, 30, [0, 255, 128]);
    let t = chw(&p.image(&tall, &mut Rng::new(0), false).unwrap());
    assert_eq!(p.resized_size((30, 10)), (36, 12));
    assert_eq!((t[0][0][0], t[1][0][0]), (-1.0, 1.0));
    assert!((t[2][0][0] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7);

    let bad = preprocess((0, 8));
    assert!(bad.image(&src, &mut Rng::new(0), false).is_err());
}

#[test]
fn preprocess_random_crop_is_seeded_and_in_range() {
    let src = load_png("resize_src.png");
    let mut p = preprocess((16, 16));
    p.center_crop = false;
    let offsets = |seed| {
        let mut rng = Rng::new(seed);
        (0..50)
            .map(|_| p.prepare(&src, &mut rng, false).unwrap().crop_top_left)
            .collect::<Vec<_>>()
    };
    let a = offsets(3);
    assert_eq!(a, offsets(3));
    assert_ne!(a, offsets(4));
    assert!(a.iter().all(|&(y, x)| y == 0 && x <= 13));
    let distinct: std::collections::BTreeSet<_> = a.iter().collect();
    assert!(distinct.len() > 5, "{distinct:?}");
}

fn pair_of(w: RgbImage, l: RgbImage) -> PreferencePair {
    PreferencePair {
        caption_w: "w".into(),
        caption_l: "l".into(),
        image_w: w,
        image_l: l,
        soft_label: None,
        location: RecordLocation::new("mem", 0),
    }
}

#[test]
fn preprocess_pair_flip_rules() {
    let src = load_png("resize_src.png");
    let pair = pair_of(src.clone(), src.clone());
    let mut p = preprocess((16, 16));
    p.random_flip = true;
    let mut rng = Rng::new(11);
    let mut combos = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (w, l, fw, fl) = p.pair(&pair, &mut rng).unwrap();
        combos.insert((fw, fl));
        assert_eq!(w.dims(), &[3, 16, 16]);
        assert_eq!(l.dims(), &[3, 16, 16]);
    }
    assert_eq!(combos.len(), 4, "independent flips (Diffusion-DPO): {combos:?}");

    p.flip_pair_together = true;
    let mut combos = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (w, l, fw, fl) = p.pair(&pair, &mut rng).unwrap();
        combos.insert((fw, fl));
        // Same image, one decision: identical tensors.
        assert_eq!(chw(&w), chw(&l));
    }
    assert_eq!(
        combos.into_iter().collect::<Vec<_>>(),
        vec![(false, false), (true, true)]
    );

    p.random_flip = false;
    let (_, _, fw, fl) = p.pair(&pair, &mut rng).unwrap();
    assert!(!fw && !fl);
}

#[test]
fn preprocess_pair_together_matches_loser_size_and_shares_the_crop() {
    let w = load_png("resize_src.png"); // 37x20
    let l = load_png("resize_pil_61x29.png");
    let mut p = preprocess((16, 16));
    p.center_crop = false;
    p.flip_pair_together = true;
    let mut rng = Rng::new(5);
    for _ in 0..10 {
        let (pw, pl) = p.prepare_pair(&pair_of(w.clone(), l.clone()), &mut rng).unwrap();
        assert_eq!(pw.crop_top_left, pl.crop_top_left);
        assert_eq!(pw.resized_size, pl.resized_size);
        assert_eq!(pl.original_size, (29, 61));
        assert_eq!(pl.pixels.dims(), &[3, 16, 16]);
    }
    // The loser is the Pillow bicubic resize of itself to the winner's size.
    let matched = resize(&l, 37, 20, ResampleFilter::Bicubic);
    let mut q = preprocess((16, 16));
    q.flip_pair_together = true;
    let (_, pl) = q.prepare_pair(&pair_of(w.clone(), l), &mut Rng::new(0)).unwrap();
    assert_eq!(
        chw(&pl.pixels),
        chw(&q.image(&matched, &mut Rng::new(0), false).unwrap())
    );
}

#[test]
fn caption_dropout_frequency_is_seeded() {
    let mut p = preprocess((8, 8));
    p.empty_caption_prob = 0.2;
    let count = |seed| {
        let mut rng = Rng::new(seed);
        (0..20_000).filter(|_| p.caption("a cat", &mut rng).is_empty()).count()
    };
    let n = count(1);
    assert_eq!(n, count(1));
    let f = n as f64 / 20_000.0;
    assert!((f - 0.2).abs() < 0.015, "dropout frequency {f}");

    p.empty_caption_prob = 0.0;
    let mut rng = Rng::new(1);
    assert!((0..1000).all(|_| p.caption("a cat", &mut rng) == "a cat"));
    assert_eq!(
        rng.next_u64(),
        Rng::new(1).next_u64(),
        "no draw when the probability is 0"
    );
    p.empty_caption_prob = 1.0;
    assert_eq!(p.caption("a cat", &mut rng), "");
}

// ----------------------------------------------------------------------------------------------
// latent cache

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn latent(v: f32) -> (Tensor, Tensor) {
    let m = Tensor::full(v, (4, 2, 3), &Device::Cpu).unwrap();
    let s = Tensor::full(v / 10.0, (4, 2, 3), &Device::Cpu).unwrap();
    (m, s)
}

#[test]
fn latent_cache_encodes_once_and_survives_reopening() {
    let root = tempfile::tempdir().unwrap();
    let calls = Cell::new(0);
    let encode = |v: f32| {
        calls.set(calls.get() + 1);
        Ok(latent(v))
    };
    let cache = LatentCache::open(root.path(), "data abc; 512; center").unwrap();
    let key = LatentKey::new(1234, true, false);
    assert!(!cache.contains(&key));
    let (m, s) = cache.get_or_encode(&key, || encode(1.5)).unwrap();
    assert_eq!((calls.get(), m.dims()), (1, &[4usize, 2, 3][..]));
    assert!(cache.contains(&key));
    let (m2, s2) = cache.get_or_encode(&key, || encode(9.0)).unwrap();
    assert_eq!(calls.get(), 1, "a hit does not encode");
    assert_eq!(m2.to_vec3::<f32>().unwrap(), m.to_vec3::<f32>().unwrap());
    assert_eq!(s2.to_vec3::<f32>().unwrap(), s.to_vec3::<f32>().unwrap());

    // Another side, flip or crop is another entry.
    for other in [
        LatentKey::new(1234, false, false),
        LatentKey::new(1234, true, true),
        LatentKey::new(1234, true, false)
            .with_crop((0, 8))
            .with_resolution((512, 512)),
    ] {
        cache.get_or_encode(&other, || encode(2.0)).unwrap();
    }
    assert_eq!(calls.get(), 4);

    // A new process (a new cache value) finds the entries.
    let reopened = LatentCache::open(root.path(), "data abc; 512; center").unwrap();
    let (m3, _) = reopened.get_or_encode(&key, || encode(7.0)).unwrap();
    assert_eq!(calls.get(), 4);
    assert_eq!(m3.to_vec3::<f32>().unwrap()[0][0][0], 1.5);

    // Whole files only: no temporary file is left, entries are sharded by index / 1000.
    let files = files_under(root.path());
    assert!(
        files.iter().all(|f| !f.to_string_lossy().ends_with(".tmp")),
        "{files:?}"
    );
    let entries: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert_eq!(entries.len(), 4);
    assert!(cache.path(&key).starts_with(cache.dir().join("00001")));
    assert!(cache.path(&key).ends_with("1234-w.safetensors"));
    assert_eq!(
        std::fs::read_to_string(cache.dir().join("identity.txt")).unwrap(),
        "data abc; 512; center"
    );

    // Another identity is another folder.
    let other = LatentCache::open(root.path(), "data abc; 768; center").unwrap();
    assert_ne!(other.dir(), cache.dir());
    other.get_or_encode(&key, || encode(3.0)).unwrap();
    assert_eq!(calls.get(), 5);
}

#[test]
fn latent_cache_reports_bad_entries_and_encodings() {
    let root = tempfile::tempdir().unwrap();
    let cache = LatentCache::open(root.path(), "id").unwrap();
    let key = LatentKey::new(0, true, false);
    // An encoder error passes through and stores nothing.
    let err = cache
        .get_or_encode(&key, || Err(Error::input("vae", "boom")))
        .unwrap_err();
    assert!(err.to_string().contains("boom"));
    assert!(!cache.contains(&key));
    // Mismatched shapes are refused.
    let bad = || {
        Ok((
            Tensor::zeros((4, 2, 2), candle_core::DType::F32, &Device::Cpu)?,
            latent(1.0).1,
        ))
    };
    assert!(cache.get_or_encode(&key, bad).is_err());
    assert!(!cache.contains(&key));
    // A damaged entry is an error naming the file.
    std::fs::create_dir_all(cache.path(&key).parent().unwrap()).unwrap();
    std::fs::write(cache.path(&key), b"truncated").unwrap();
    let msg = cache.get_or_encode(&key, || Ok(latent(1.0))).unwrap_err().to_string();
    assert!(
        msg.contains("0-w.safetensors") && msg.contains("delete the file"),
        "{msg}"
    );
    // An entry holding another key is refused.
    let other = LatentKey::new(0, false, false);
    cache.get_or_encode(&other, || Ok(latent(1.0))).unwrap();
    std::fs::copy(cache.path(&other), cache.path(&key)).unwrap();
    let msg = cache.get_or_encode(&key, || Ok(latent(1.0))).unwrap_err().to_string();
    assert!(msg.contains("holds key \"0-l.safetensors\""), "{msg}");
    // A folder claimed by another identity is refused.
    std::fs::write(cache.dir().join("identity.txt"), "something else").unwrap();
    let err = LatentCache::open(root.path(), "id").unwrap_err().to_string();
    assert!(err.contains("identity.txt") || err.contains("something else"), "{err}");
}

// ----------------------------------------------------------------------------------------------
// skipped records, late skips, byte-order marks, root_only (issue 23)

#[test]
fn pickapic_undecodable_image_is_skipped_once_in_skip_mode() {
    let ds = PairDataset::open(&spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"))).unwrap();
    let exp = &expected()["pickapic_tiny.parquet"];
    let row = exp["corrupt"]["row"].as_i64().unwrap();
    let i = pair_of_row(&ds, &exp["drop_ties"], row);
    assert!(ds.get_or_skip(i).unwrap().is_none());
    assert!(ds.get_or_skip(i).unwrap().is_none(), "still skipped");
    let late = ds.late_skipped(0);
    assert_eq!(late.len(), 1, "listed once: {late:?}");
    assert_eq!(late[0].0.index as i64, row);
    assert!(
        late[0].1.contains("jpg_1") && late[0].1.contains("cannot decode"),
        "{late:?}"
    );
    assert!(ds.late_skipped(1).is_empty());
    let other = (0..ds.len()).find(|&k| k != i).unwrap();
    assert!(ds.get_or_skip(other).unwrap().is_some());

    // Under the error policy (limited to rows before the null label of row 5, an error when
    // opening) the undecodable image is an error.
    let mut s = spec(DataFormat::Pickapic, data_dir().join("pickapic_tiny.parquet"));
    s.bad_records = BadRecordPolicy::Error;
    s.limit = Some(i + 1);
    let ds = PairDataset::open(&s).unwrap();
    assert!(ds.get_or_skip(i).is_err());
}

#[test]
fn jsonl_and_folders_undecodable_images_are_skipped_with_their_location() {
    let dir = jsonl_fixture(&JSONL_LINES[..2]);
    std::fs::write(dir.path().join("img/0_l.png"), b"garbage").unwrap();
    let ds = PairDataset::open(&spec(DataFormat::Jsonl, dir.path())).unwrap();
    assert!(ds.get_or_skip(0).unwrap().is_none());
    assert_eq!(ds.get_or_skip(1).unwrap().unwrap().caption_w, "p1");
    let late = ds.late_skipped(0);
    assert_eq!((late[0].0.index, late[0].0.line), (0, Some(1)));
    assert!(
        late[0].1.contains("rejected") && late[0].1.contains("cannot decode"),
        "{late:?}"
    );

    let dir = folders_fixture("captions.txt", "a.png\tan apple\nb.png\ta bee\n");
    std::fs::write(dir.path().join("w/b.png"), b"garbage").unwrap();
    let ds = PairDataset::open(&spec(DataFormat::Folders, dir.path())).unwrap();
    assert!(ds.get_or_skip(1).unwrap().is_none());
    let late = ds.late_skipped(0);
    assert!(
        late[0].0.file.ends_with("w/b.png") && late[0].0.line.is_none(),
        "{late:?}"
    );
    assert!(ds.get_or_skip(0).unwrap().is_some(), "a.png decodes");
    // The last usable pair found bad leaves none: an error that says so.
    std::fs::write(dir.path().join("l/a.png"), b"garbage").unwrap();
    let ds = PairDataset::open(&spec(DataFormat::Folders, dir.path())).unwrap();
    assert!(ds.get_or_skip(0).unwrap().is_none());
    let msg = ds.get_or_skip(1).err().unwrap().to_string();
    assert!(
        msg.contains("no usable preference pairs: all 4 record(s) were skipped"),
        "{msg}"
    );
}

#[test]
fn jsonl_byte_order_mark_is_ignored() {
    let dir = jsonl_fixture(&JSONL_LINES[..2]);
    let text = std::fs::read_to_string(dir.path().join("pairs.jsonl")).unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), format!("\u{feff}{text}")).unwrap();
    let ds = PairDataset::open(&spec(DataFormat::Jsonl, dir.path())).unwrap();
    assert_eq!(ds.len(), 2);
    assert!(ds.skipped().is_empty(), "{:?}", ds.skipped());
}

#[test]
fn jsonl_skip_reasons_name_wrong_types_and_out_of_range_soft_labels() {
    let dir = jsonl_fixture(&[
        r#"{"prompt": 5, "chosen": "img/0_w.png", "rejected": "img/0_l.png"}"#,
        r#"{"chosen": "img/0_w.png", "rejected": "img/0_l.png"}"#,
        r#"{"prompt": "p", "chosen": "img/0_w.png", "rejected": "img/0_l.png", "soft_label": 7.5}"#,
    ]);
    let ds = PairDataset::open(&spec(DataFormat::Jsonl, dir.path())).unwrap();
    assert!(ds.is_empty());
    let skipped = ds.skipped();
    let lines: Vec<Option<usize>> = skipped.iter().map(|(l, _)| l.line).collect();
    assert_eq!(lines, [Some(1), Some(2), Some(3)]);
    assert!(skipped[0].1.contains("invalid type: integer `5`"), "{skipped:?}");
    assert!(skipped[1].1.contains("missing field `prompt`"), "{skipped:?}");
    assert!(skipped[2].1.contains("got 7.5"), "{skipped:?}");
    let msg = ds.ensure_usable().unwrap_err().to_string();
    assert!(
        msg.contains("no usable preference pairs: all 3 record(s) were skipped, first: "),
        "{msg}"
    );
    assert!(msg.contains("pairs.jsonl: record 2 (line 3): soft label"), "{msg}");
}

#[test]
fn jsonl_paths_outside_the_folder_are_allowed_unless_root_only() {
    let dir = jsonl_fixture(&[]);
    let abs = dir.path().join("img/1_w.png");
    let lines = [
        r#"{"prompt": "up", "chosen": "../img/0_w.png", "rejected": "../img/0_l.png"}"#.to_string(),
        serde_json::json!({"prompt": "abs", "chosen": abs, "rejected": "../img/1_l.png"}).to_string(),
        r#"{"prompt": "in", "chosen": "own_w.png", "rejected": "own_l.png"}"#.to_string(),
    ];
    let sub = dir.path().join("sub");
    save(&solid(4, 4, [1, 2, 3]), &sub.join("own_w.png"));
    save(&solid(4, 4, [3, 2, 1]), &sub.join("own_l.png"));
    std::fs::write(sub.join("pairs.jsonl"), lines.join("\n")).unwrap();
    let mut s = spec(DataFormat::Jsonl, sub.join("pairs.jsonl"));
    assert_eq!(PairDataset::open(&s).unwrap().len(), 3, "allowed by default");

    s.root_only = true;
    let ds = PairDataset::open(&s).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.get(0).unwrap().caption_w, "in");
    let reasons: Vec<&str> = ds.skipped().iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(reasons.len(), 2);
    for r in &reasons {
        assert!(
            r.contains("outside the dataset folder") && r.contains("root_only"),
            "{r}"
        );
    }
    assert!(
        reasons[1].contains("1_w.png"),
        "the absolute path is named: {reasons:?}"
    );

    s.bad_records = BadRecordPolicy::Error;
    let err = PairDataset::open(&s).err().unwrap();
    assert!(matches!(err, Error::Record { index: 0, .. }), "{err}");
}

#[cfg(unix)]
#[test]
fn folders_root_only_refuses_links_to_files_outside() {
    let dir = folders_fixture("captions.txt", "a.png\tan apple\nb.png\ta bee\n");
    let outside = tempfile::tempdir().unwrap();
    save(&solid(5, 7, [9, 9, 9]), &outside.path().join("x.png"));
    std::fs::remove_file(dir.path().join("l/b.png")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("x.png"), dir.path().join("l/b.png")).unwrap();
    let mut s = spec(DataFormat::Folders, dir.path());
    assert_eq!(PairDataset::open(&s).unwrap().len(), 2);
    s.root_only = true;
    let ds = PairDataset::open(&s).unwrap();
    assert_eq!(ds.len(), 1);
    assert!(
        ds.skipped()
            .iter()
            .any(|(l, r)| l.file.ends_with("w/b.png") && r.contains("l image") && r.contains("outside")),
        "{:?}",
        ds.skipped()
    );
}

#[test]
fn skipped_records_file_round_trips_and_terminal_list_is_capped() {
    use diffalign::data::skipped::{read_skipped, summary_lines, write_skipped};
    let records: Vec<(RecordLocation, String)> = (0..25)
        .map(|i| {
            let loc = if i % 2 == 0 {
                RecordLocation::at_line("pairs.jsonl", i)
            } else {
                RecordLocation::new("shard.parquet", i)
            };
            (loc, format!("reason {i}"))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skipped_records.jsonl");
    write_skipped(&path, &records).unwrap();
    assert_eq!(read_skipped(&path).unwrap(), records);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    let lines = summary_lines(&records, 20);
    assert_eq!(lines.len(), 21);
    assert_eq!(lines[0], "pairs.jsonl: record 0 (line 1): reason 0");
    assert_eq!(lines[1], "shard.parquet: record 1: reason 1");
    assert_eq!(lines[20], format!("... and {} more", records.len() - 20));
}
