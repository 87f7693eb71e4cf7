//! Pick-a-Pic v2 style parquet (`yuvalkirstain/pickapic_v2`): `jpg_0`, `jpg_1` (encoded images),
//! `label_0` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie) and `caption`; optionally
//! per-image captions `caption_0` / `caption_1` (Pick-Double Caption, DCPO) and a soft-label column
//! (SmPO). `path` is one `.parquet` file or a folder whose `*.parquet` shards are read in name order.
//!
//! Rules (research notes §1.3, §3.3): ties are dropped before anything else unless `drop_ties =
//! false` (then image 0 counts as preferred, as in the diffusers port); `label_0 = 0` swaps the
//! pair so the preferred image comes first, and per-image captions move with their images; the soft
//! label is the probability of the preferred image after this ordering. Any other label value, a
//! null label, caption or soft label is a bad record.
//!
//! Opening reads only the label, caption and soft-label columns (with the parquet record reader).
//! `get` reads one row's image and caption values with column readers that skip whole pages
//! unread, so a lookup decompresses one page per column: the page holding the row. Pages are
//! what the writer made them: pyarrow closes a page after at most 1024 rows, so a file with large
//! row groups of large images can have pages of hundreds of MB, and random access into it is
//! slow (about 0.5 s per lookup for 200 MB pages); rewrite such files with small row groups
//! (`pyarrow.parquet.write_table(t, f, compression="snappy", row_group_size=100)`). Reads in row
//! order are cheap anyway: the readers of the last row group read are kept (one per column), and a
//! later row of that group continues from where the previous lookup stopped.
//! Images may be plain binary columns or Hugging Face `Image` structs (`{bytes, path}`).
//!
//! Codecs: this build reads uncompressed and snappy parquet (Pick-a-Pic v2's shards are snappy);
//! a column compressed otherwise is an error naming the file, the column and the codec.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parquet::basic::{Compression, Type as PhysicalType};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::ByteArrayType;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::ReaderProperties;
use parquet::file::reader::{FileReader, RowGroupReader, SerializedFileReader};
use parquet::file::serialized_reader::SerializedRowGroupReader;
use parquet::record::{Field, Row};
use parquet::schema::types::{SchemaDescriptor, Type};

use super::dataset::{check_soft_label, decode_image, handle_bad, PairSource, PreferencePair, RecordLocation};
use super::spec::DataSpec;
use crate::{Error, Result};

/// One parquet file: its footer and the leaf columns `get` reads.
struct Shard {
    path: PathBuf,
    meta: Arc<ParquetMetaData>,
    /// Leaf column index of image 0 and image 1.
    jpg: [usize; 2],
    /// Leaf column index of the caption of image 0 and image 1 (the same prompt column twice
    /// without dual captions).
    caption: [usize; 2],
    /// Row index of each row group's first row.
    row_group_start: Vec<usize>,
}

/// One usable row.
#[derive(Debug, Clone, Copy)]
struct Entry {
    shard: u32,
    row_group: u32,
    row_in_group: u32,
    /// Image 1 is preferred.
    swap: bool,
    soft_label: Option<f32>,
}

pub(super) struct PickapicPairs {
    shards: Vec<Shard>,
    entries: Vec<Entry>,
    column_names: [[String; 2]; 2],
    skipped: Vec<(RecordLocation, String)>,
    cursors: Mutex<Vec<Cursor>>,
}

/// The parquet files of `path`: the file itself, or the folder's `*.parquet` in name order.
pub(crate) fn parquet_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "parquet") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "*.parquet shards".into(),
        });
    }
    Ok(files)
}

/// The schema of a top-level field, or an error listing the file's columns.
fn top_field(path: &Path, schema: &SchemaDescriptor, name: &str) -> Result<Arc<Type>> {
    let fields = schema.root_schema().get_fields();
    fields.iter().find(|f| f.name() == name).cloned().ok_or_else(|| {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        Error::config(
            path,
            format!("column {name}"),
            format!("not found; the file has {}", names.join(", ")),
        )
    })
}

fn describe_type(t: &Type) -> String {
    if t.is_primitive() {
        format!("{:?}", t.get_physical_type()).to_lowercase()
    } else {
        let names: Vec<&str> = t.get_fields().iter().map(|f| f.name()).collect();
        format!("a group {{{}}}", names.join(", "))
    }
}

/// The leaf column index whose path is `parts`, if it is a non-repeated binary column.
fn binary_leaf(schema: &SchemaDescriptor, parts: &[&str]) -> Option<usize> {
    (0..schema.num_columns()).find(|&i| {
        let c = schema.column(i);
        c.path().parts().iter().map(String::as_str).eq(parts.iter().copied())
            && c.physical_type() == PhysicalType::BYTE_ARRAY
            && c.max_rep_level() == 0
    })
}

/// Leaf index of an image column: binary, or a struct with a binary `bytes` field.
fn image_leaf(path: &Path, schema: &SchemaDescriptor, name: &str) -> Result<usize> {
    let field = top_field(path, schema, name)?;
    binary_leaf(schema, &[name])
        .or_else(|| binary_leaf(schema, &[name, "bytes"]))
        .ok_or_else(|| {
            Error::config(
                path,
                format!("column {name}"),
                format!(
                    "expected binary image bytes or a {{bytes, path}} struct, got {}",
                    describe_type(&field)
                ),
            )
        })
}

/// Leaf index of a caption column: binary (string) and not nested.
fn caption_leaf(path: &Path, schema: &SchemaDescriptor, name: &str) -> Result<usize> {
    let field = top_field(path, schema, name)?;
    binary_leaf(schema, &[name]).ok_or_else(|| {
        Error::config(
            path,
            format!("column {name}"),
            format!("expected a string column, got {}", describe_type(&field)),
        )
    })
}

/// Leaf index of a numeric column (label, soft label): a primitive, not nested.
fn scalar_leaf(path: &Path, schema: &SchemaDescriptor, name: &str) -> Result<usize> {
    let field = top_field(path, schema, name)?;
    (0..schema.num_columns())
        .find(|&i| {
            let c = schema.column(i);
            c.path().parts().len() == 1 && c.path().parts()[0] == name && c.max_rep_level() == 0
        })
        .ok_or_else(|| {
            Error::config(
                path,
                format!("column {name}"),
                format!("expected a number column, got {}", describe_type(&field)),
            )
        })
}

pub(crate) fn open_reader(path: &Path) -> Result<SerializedFileReader<File>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    SerializedFileReader::new(f)
        .map_err(|e| Error::config(path, "parquet", format!("not a readable parquet file: {e}")))
}

/// Fails on a codec this build cannot decompress, in any of the `leaves` we read.
fn check_codecs(path: &Path, meta: &ParquetMetaData, leaves: &[usize]) -> Result<()> {
    for rg in meta.row_groups() {
        for &i in leaves {
            let col = rg.column(i);
            match col.compression() {
                Compression::UNCOMPRESSED | Compression::SNAPPY => {}
                other => {
                    return Err(Error::config(
                        path,
                        format!("column {}", col.column_path().string()),
                        format!(
                            "compressed with {other}; diffalign reads uncompressed and snappy parquet only \
                             (rewrite the file with snappy compression)"
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A parquet value as a number, `Ok(None)` for null, `Err(description)` for another type.
fn number(f: &Field) -> std::result::Result<Option<f64>, String> {
    Ok(Some(match f {
        Field::Null => return Ok(None),
        Field::Double(v) => *v,
        Field::Float(v) => *v as f64,
        Field::Float16(v) => v.to_f64(),
        Field::Byte(v) => *v as f64,
        Field::Short(v) => *v as f64,
        Field::Int(v) => *v as f64,
        Field::Long(v) => *v as f64,
        Field::UByte(v) => *v as f64,
        Field::UShort(v) => *v as f64,
        Field::UInt(v) => *v as f64,
        Field::ULong(v) => *v as f64,
        Field::Bool(b) => f64::from(u8::from(*b)),
        other => return Err(describe_field(other)),
    }))
}

/// A parquet value as text, `Ok(None)` for null, `Err(description)` for another type.
pub(crate) fn text(f: &Field) -> std::result::Result<Option<String>, String> {
    match f {
        Field::Null => Ok(None),
        Field::Str(s) => Ok(Some(s.clone())),
        Field::Bytes(b) => std::str::from_utf8(b.data())
            .map(|s| Some(s.to_string()))
            .map_err(|_| "binary that is not UTF-8".to_string()),
        other => Err(describe_field(other)),
    }
}

fn describe_field(f: &Field) -> String {
    let kind = match f {
        Field::Str(_) => "string",
        Field::Bytes(_) => "binary",
        Field::Group(_) => "a group",
        Field::ListInternal(_) => "a list",
        Field::MapInternal(_) => "a map",
        Field::Decimal(_) => "decimal",
        _ => "a value",
    };
    let mut shown = f.to_string();
    if shown.len() > 40 {
        shown.truncate(shown.char_indices().nth(40).map(|(i, _)| i).unwrap_or(shown.len()));
        shown.push_str("...");
    }
    format!("{kind} {shown}")
}

fn field<'a>(row: &'a Row, name: &str) -> &'a Field {
    static NULL: Field = Field::Null;
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
        .unwrap_or(&NULL)
}

/// The projection of the root schema onto the top-level fields `names`.
fn projection(path: &Path, schema: &SchemaDescriptor, names: &[&str]) -> Result<Type> {
    let mut fields = Vec::new();
    for name in names {
        let f = top_field(path, schema, name)?;
        if !fields.iter().any(|g: &Arc<Type>| g.name() == f.name()) {
            fields.push(f);
        }
    }
    Type::group_type_builder(schema.root_schema().name())
        .with_fields(fields)
        .build()
        .map_err(|e| Error::config(path, "parquet", format!("cannot project the schema: {e}")))
}

impl PickapicPairs {
    pub(super) fn open(spec: &DataSpec) -> Result<Self> {
        let c = &spec.columns;
        let (cap0, cap1) = if spec.dual_captions {
            (c.caption_0.as_str(), c.caption_1.as_str())
        } else {
            (c.caption.as_str(), c.caption.as_str())
        };
        let limit = spec.limit.unwrap_or(usize::MAX);
        let mut shards = Vec::new();
        let mut entries = Vec::new();
        let mut skipped = Vec::new();
        'files: for path in parquet_files(&spec.path)? {
            if entries.len() >= limit {
                break;
            }
            let reader = open_reader(&path)?;
            let meta = Arc::new(reader.metadata().clone());
            let schema = meta.file_metadata().schema_descr();
            let label_leaf = scalar_leaf(&path, schema, &c.label_0)?;
            let soft_leaf = c
                .soft_label
                .as_deref()
                .map(|s| scalar_leaf(&path, schema, s))
                .transpose()?;
            let jpg = [
                image_leaf(&path, schema, &c.jpg_0)?,
                image_leaf(&path, schema, &c.jpg_1)?,
            ];
            let caption = [caption_leaf(&path, schema, cap0)?, caption_leaf(&path, schema, cap1)?];
            let mut leaves = vec![label_leaf, jpg[0], jpg[1], caption[0], caption[1]];
            leaves.extend(soft_leaf);
            check_codecs(&path, &meta, &leaves)?;

            let mut names = vec![c.label_0.as_str(), cap0, cap1];
            names.extend(c.soft_label.as_deref());
            let proj = projection(&path, schema, &names)?;
            let mut row_group_start = Vec::with_capacity(meta.num_row_groups());
            let mut start = 0usize;
            for rg in meta.row_groups() {
                row_group_start.push(start);
                start += usize::try_from(rg.num_rows()).unwrap_or(0);
            }
            let shard_index = shards.len() as u32;
            let scan_error = |row: usize, e: parquet::errors::ParquetError| Error::Record {
                file: path.clone(),
                index: row,
                reason: format!("cannot read row: {e}"),
            };
            for (rg, &first_row) in row_group_start.iter().enumerate() {
                let group = reader.get_row_group(rg).map_err(|e| scan_error(first_row, e))?;
                let rows = group
                    .get_row_iter(Some(proj.clone()))
                    .map_err(|e| scan_error(first_row, e))?;
                for (ri, row) in rows.enumerate() {
                    let row_index = first_row + ri;
                    let row = row.map_err(|e| scan_error(row_index, e))?;
                    let loc = RecordLocation::new(&path, row_index);
                    let type_error = |col: &str, want: &str, got: String| {
                        loc.error(format!("column {col}: expected {want}, got {got}"))
                    };

                    let label = number(field(&row, &c.label_0)).map_err(|g| type_error(&c.label_0, "a number", g))?;
                    let Some(label) = label else {
                        handle_bad(spec.bad_records, loc, format!("{} is null", c.label_0), &mut skipped)?;
                        continue;
                    };
                    let swap = if label == 1.0 {
                        false
                    } else if label == 0.0 {
                        true
                    } else if label == 0.5 {
                        if spec.drop_ties {
                            continue;
                        }
                        false
                    } else {
                        let reason = format!("{} must be 0, 0.5 or 1, got {label}", c.label_0);
                        handle_bad(spec.bad_records, loc, reason, &mut skipped)?;
                        continue;
                    };
                    let mut problem = None;
                    for name in [cap0, cap1] {
                        let t = text(field(&row, name)).map_err(|g| type_error(name, "a string", g))?;
                        if t.is_none() && problem.is_none() {
                            problem = Some(format!("{name} is null"));
                        }
                    }
                    let mut soft_label = None;
                    if let Some(name) = c.soft_label.as_deref() {
                        match number(field(&row, name)).map_err(|g| type_error(name, "a number", g))? {
                            None => problem = problem.or(Some(format!("{name} is null"))),
                            Some(p) => match check_soft_label(p) {
                                Ok(p) => soft_label = Some(p),
                                Err(reason) => problem = problem.or(Some(format!("{name}: {reason}"))),
                            },
                        }
                    }
                    if let Some(reason) = problem {
                        handle_bad(spec.bad_records, loc, reason, &mut skipped)?;
                        continue;
                    }
                    entries.push(Entry {
                        shard: shard_index,
                        row_group: rg as u32,
                        row_in_group: ri as u32,
                        swap,
                        soft_label,
                    });
                    if entries.len() >= limit {
                        shards.push(Shard {
                            path: path.clone(),
                            meta,
                            jpg,
                            caption,
                            row_group_start,
                        });
                        break 'files;
                    }
                }
            }
            shards.push(Shard {
                path,
                meta,
                jpg,
                caption,
                row_group_start,
            });
        }
        let column_names = [[c.jpg_0.clone(), c.jpg_1.clone()], [cap0.to_string(), cap1.to_string()]];
        Ok(PickapicPairs {
            shards,
            entries,
            column_names,
            skipped,
            cursors: Mutex::new(Vec::new()),
        })
    }
}

type BinaryReader = ColumnReaderImpl<ByteArrayType>;

/// A column reader left positioned after a row, so a later row of the same row group is reached
/// by skipping forward instead of re-reading (and re-decompressing) the pages before it.
struct Cursor {
    /// (shard, row group, leaf column).
    key: (u32, u32, usize),
    next_row: usize,
    reader: BinaryReader,
}

/// Cursors kept: one per column read by `get` (two images, up to two captions). Each holds at
/// most one decompressed page.
const MAX_CURSORS: usize = 4;

impl PickapicPairs {
    /// Reads the binary value of leaf column `leaf` in row `row` of row group `rg` of `shard`
    /// (`None` for null): from a cursor at or before the row when there is one, else from a new
    /// column reader that skips whole pages up to the row.
    fn read_binary<'a>(
        &self,
        (shard_index, shard): (u32, &'a Shard),
        rg: usize,
        leaf: usize,
        row: usize,
        group: &mut Option<SerializedRowGroupReader<'a, File>>,
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let key = (shard_index, rg as u32, leaf);
        let cached = {
            let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
            let found = cursors.iter().position(|c| c.key == key && c.next_row <= row);
            found.map(|i| cursors.remove(i))
        };
        let (mut reader, next_row) = match cached {
            Some(c) => (c.reader, c.next_row),
            None => {
                if group.is_none() {
                    let file = File::open(&shard.path).map_err(|e| e.to_string())?;
                    let props = Arc::new(ReaderProperties::builder().build());
                    let g = SerializedRowGroupReader::new(Arc::new(file), shard.meta.row_group(rg), None, props)
                        .map_err(|e| e.to_string())?;
                    *group = Some(g);
                }
                let g = group.as_ref().expect("set above");
                match g.get_column_reader(leaf).map_err(|e| e.to_string())? {
                    ColumnReader::ByteArrayColumnReader(r) => (r, 0),
                    _ => return Err("not a binary column".into()),
                }
            }
        };
        let gap = row - next_row;
        let skipped = reader.skip_records(gap).map_err(|e| e.to_string())?;
        if skipped != gap {
            return Err(format!("the row group ends after {} rows", next_row + skipped));
        }
        let (mut defs, mut reps, mut values) = (Vec::new(), Vec::new(), Vec::new());
        let (records, _, _) = reader
            .read_records(1, Some(&mut defs), Some(&mut reps), &mut values)
            .map_err(|e| e.to_string())?;
        if records != 1 {
            return Err("the row group ends before this row".into());
        }
        let value = values.first().map(|v| v.data().to_vec());
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        if cursors.len() >= MAX_CURSORS {
            cursors.remove(0);
        }
        cursors.push(Cursor {
            key,
            next_row: row + 1,
            reader,
        });
        Ok(value)
    }
}

impl PairSource for PickapicPairs {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, i: usize) -> Result<PreferencePair> {
        let e = self.entries[i];
        let shard = &self.shards[e.shard as usize];
        let (rg, row) = (e.row_group as usize, e.row_in_group as usize);
        let loc = self.location(i);
        let group = std::cell::RefCell::new(None);
        let read = |leaf: usize, name: &str| -> Result<Vec<u8>> {
            self.read_binary((e.shard, shard), rg, leaf, row, &mut group.borrow_mut())
                .map_err(|err| loc.error(format!("{name}: cannot read: {err}")))?
                .ok_or_else(|| loc.error(format!("{name} is null")))
        };
        let [jpg_names, caption_names] = &self.column_names;
        let image = |side: usize| decode_image(&read(shard.jpg[side], &jpg_names[side])?, &loc, &jpg_names[side]);
        let caption = |side: usize| -> Result<String> {
            let bytes = read(shard.caption[side], &caption_names[side])?;
            String::from_utf8(bytes).map_err(|_| loc.error(format!("{}: not UTF-8", caption_names[side])))
        };
        let (mut image_w, mut image_l) = (image(0)?, image(1)?);
        let mut caption_w = caption(0)?;
        let mut caption_l = if shard.caption[1] == shard.caption[0] {
            caption_w.clone()
        } else {
            caption(1)?
        };
        if e.swap {
            std::mem::swap(&mut image_w, &mut image_l);
            std::mem::swap(&mut caption_w, &mut caption_l);
        }
        Ok(PreferencePair {
            caption_w,
            caption_l,
            image_w,
            image_l,
            soft_label: e.soft_label,
            location: loc,
        })
    }

    fn skipped(&self) -> &[(RecordLocation, String)] {
        &self.skipped
    }

    fn location(&self, i: usize) -> RecordLocation {
        let e = self.entries[i];
        let shard = &self.shards[e.shard as usize];
        RecordLocation::new(
            &shard.path,
            shard.row_group_start[e.row_group as usize] + e.row_in_group as usize,
        )
    }

    fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }
}
