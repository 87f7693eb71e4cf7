//! Unpaired, labelled images (Diffusion-KTO): the JSONL, `good/` `bad/` folders and split
//! Pick-a-Pic layouts, with bad records skipped and listed or reported naming file and record.

mod common;

use std::path::Path;

use common::*;
use diffalign::data::{BadRecordPolicy, DataFormat, DataSpec, PairDataset, UnpairedDataset};
use diffalign::Error;
use image::{Rgb, RgbImage};

fn save(c: [u8; 3], path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(8, 6, Rgb(c)).save(path).unwrap();
}

const LINES: [&str; 6] = [
    r#"{"image": "img/0.png", "prompt": "p0", "label": true}"#,
    r#"{"image": "img/1.png", "caption": "p1", "label": false, "extra": 1}"#,
    r#"{"image": "img/2.png", "prompt": "p2", "label": "yes"}"#,
    "",
    r#"{"image": "img/9.png", "prompt": "p4", "label": true}"#,
    r#"{"image": "img/2.png", "prompt": "p5"}"#,
];

fn jsonl_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u8 {
        save([i * 40, 200, 0], &dir.path().join(format!("img/{i}.png")));
    }
    std::fs::write(dir.path().join("labels.jsonl"), LINES.join("\n")).unwrap();
    dir
}

#[test]
fn unpaired_jsonl_reads_labels_and_skips_bad_lines() {
    let dir = jsonl_fixture();
    for path in [dir.path().to_path_buf(), dir.path().join("labels.jsonl")] {
        let ds = UnpairedDataset::open(&DataSpec::new(DataFormat::Jsonl, &path)).unwrap();
        assert_eq!(ds.len(), 2);
        let a = ds.get(0).unwrap();
        assert_eq!((a.caption.as_str(), a.desirable, a.location.index), ("p0", true, 0));
        let b = ds.get(1).unwrap();
        assert_eq!((b.caption.as_str(), b.desirable, b.location.index), ("p1", false, 1));
        assert_eq!(*b.image.get_pixel(0, 0), Rgb([40, 200, 0]));
        assert_eq!((ds.desirable(0), ds.desirable(1)), (true, false));
        let skipped: Vec<(usize, &str)> = ds.skipped().iter().map(|(l, r)| (l.index, r.as_str())).collect();
        assert_eq!(skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 4, 5]);
        assert!(skipped[0].1.contains("label"), "{skipped:?}");
        assert!(
            skipped[1].1.contains("9.png") && skipped[1].1.contains("not found"),
            "{skipped:?}"
        );
        assert!(skipped[2].1.contains("label"), "{skipped:?}");
        assert!(ds.skipped()[0].0.file.ends_with("labels.jsonl"));
    }
}

#[test]
fn unpaired_jsonl_bad_line_is_record_error_with_line_index() {
    let dir = jsonl_fixture();
    let mut s = DataSpec::new(DataFormat::Jsonl, dir.path());
    s.bad_records = BadRecordPolicy::Error;
    let err = UnpairedDataset::open(&s).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Record { index: 2, .. }), "{msg}");
    assert!(msg.contains("labels.jsonl: record 2") && msg.contains("label"), "{msg}");
}

#[test]
fn unpaired_jsonl_undecodable_image_is_record_error_naming_it() {
    let dir = jsonl_fixture();
    std::fs::write(dir.path().join("img/1.png"), b"not a png").unwrap();
    let ds = UnpairedDataset::open(&DataSpec::new(DataFormat::Jsonl, dir.path())).unwrap();
    let msg = ds.get(1).err().unwrap().to_string();
    assert!(msg.contains("labels.jsonl: record 1") && msg.contains("1.png"), "{msg}");
}

fn folders_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    save([200, 0, 0], &dir.path().join("good/a.png"));
    save([0, 200, 0], &dir.path().join("good/b.png"));
    save([0, 0, 200], &dir.path().join("bad/a.png"));
    save([9, 9, 9], &dir.path().join("bad/z.png"));
    std::fs::write(
        dir.path().join("captions.txt"),
        "a.png\tan apple\nb.png\ta banana\nbroken line\n",
    )
    .unwrap();
    dir
}

#[test]
fn unpaired_folders_label_good_and_bad_and_skip_names_without_captions() {
    let dir = folders_fixture();
    let ds = UnpairedDataset::open(&DataSpec::new(DataFormat::Folders, dir.path())).unwrap();
    let got: Vec<(String, bool)> = (0..ds.len())
        .map(|i| {
            let r = ds.get(i).unwrap();
            (r.caption, r.desirable)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("an apple".to_string(), true),
            ("a banana".to_string(), true),
            ("an apple".to_string(), false)
        ]
    );
    assert_eq!(*ds.get(2).unwrap().image.get_pixel(0, 0), Rgb([0, 0, 200]));
    let reasons: Vec<String> = ds.skipped().iter().map(|(l, r)| format!("{l}: {r}")).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("captions.txt") && r.contains("NAME<TAB>caption")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("bad/z.png") && r.contains("no caption for z.png")),
        "{reasons:?}"
    );
}

#[test]
fn unpaired_folders_errors_name_the_record_or_the_missing_folder() {
    let dir = folders_fixture();
    let mut s = DataSpec::new(DataFormat::Folders, dir.path());
    s.bad_records = BadRecordPolicy::Error;
    let msg = UnpairedDataset::open(&s).err().unwrap().to_string();
    assert!(
        msg.contains("captions.txt") && msg.contains("NAME<TAB>caption"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir.path().join("bad")).unwrap();
    let msg = UnpairedDataset::open(&DataSpec::new(DataFormat::Folders, dir.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("bad"), "{msg}");
}

#[test]
fn unpaired_pickapic_splits_pairs_winner_desirable_ties_dropped() {
    let path = own_fixtures().join("data/pickapic_tiny.parquet");
    let spec = DataSpec::new(DataFormat::Pickapic, &path);
    let pairs = PairDataset::open(&spec).unwrap();
    let ds = UnpairedDataset::open(&spec).unwrap();
    assert_eq!(ds.len(), 2 * pairs.len());
    assert_eq!(ds.skipped(), pairs.skipped());
    for i in 0..pairs.len() {
        let Ok(p) = pairs.get(i) else {
            // The fixture's corrupt image: both sides fail, naming the record.
            let msg = ds.get(2 * i).err().unwrap().to_string();
            assert!(msg.contains("pickapic_tiny.parquet"), "{msg}");
            continue;
        };
        let (w, l) = (ds.get(2 * i).unwrap(), ds.get(2 * i + 1).unwrap());
        assert!(w.desirable && !l.desirable);
        assert_eq!(
            (w.caption.as_str(), l.caption.as_str()),
            (p.caption_w.as_str(), p.caption_l.as_str())
        );
        assert_eq!(w.image, p.image_w);
        assert_eq!(l.image, p.image_l);
        assert_eq!(w.location, p.location);
    }
}

#[test]
fn unpaired_missing_path_is_an_error() {
    let msg = UnpairedDataset::open(&DataSpec::new(DataFormat::Jsonl, "/nonexistent/labels.jsonl"))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("/nonexistent/labels.jsonl"), "{msg}");
}
