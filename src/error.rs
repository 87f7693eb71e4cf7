//! The library's error type: every variant names its subject (file, tensor, config key, record).

use std::path::PathBuf;

/// Errors returned by the diffalign library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The OS error is part of the message and not a
    /// `source`, so that an error chain printed with `{:#}` shows it once.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying IO error.
        cause: std::io::Error,
    },

    /// A required file or folder is missing.
    #[error("{}: {what} not found", path.display())]
    MissingFile {
        /// Where it was looked for.
        path: PathBuf,
        /// What it should have held ("unet config", "tokenizer vocabulary", ...).
        what: String,
    },

    /// A tensor the model needs is not in the checkpoint.
    #[error("{}: missing tensor {name}", file.display())]
    MissingTensor {
        /// The checkpoint file (or folder, for sharded checkpoints).
        file: PathBuf,
        /// The full tensor name.
        name: String,
    },

    /// A tensor has another shape than the model needs.
    #[error("{}: {name}: expected shape {expected:?}, got {got:?}", file.display())]
    ShapeMismatch {
        /// The checkpoint file.
        file: PathBuf,
        /// The full tensor name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },

    /// A safetensors file that cannot be parsed (truncated, corrupt header, bad offsets).
    #[error("{}: not a valid safetensors file: {reason}", file.display())]
    BadSafetensors {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A PyTorch pickle checkpoint (`.ckpt`, `.pt`, `.bin`) that cannot be read: truncated, an
    /// unsupported opcode or layout, a tensor outside its storage.
    #[error("{}: not a readable PyTorch checkpoint: {reason}", file.display())]
    BadPickle {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A pickle that refers to a Python global other than the tensor-rebuilding ones: it would
    /// run code if loaded by Python, so it is refused before anything else is read.
    #[error(
        "{}: refused: the pickle refers to the Python global `{global}`, which is not a tensor, storage, dtype or OrderedDict (only those are allowed; nothing is ever called)",
        file.display()
    )]
    UnsafePickle {
        /// The file.
        file: PathBuf,
        /// The global as `module.name`.
        global: String,
    },

    /// Tensors in the checkpoint that no layer used (a sign of a wrong architecture or config).
    #[error("{}: {} tensor(s) not used by the model: {}", file.display(), names.len(), preview(names))]
    UnusedTensors {
        /// The checkpoint file.
        file: PathBuf,
        /// The unused names (sorted).
        names: Vec<String>,
    },

    /// A configuration value that is missing, malformed or not supported.
    #[error("{}: {key}: {reason}", file.display())]
    Config {
        /// The configuration file (or a pseudo path such as `--scheduler`).
        file: PathBuf,
        /// The configuration key.
        key: String,
        /// What is wrong, with the value found.
        reason: String,
    },

    /// A malformed record in a data file (line, row or entry `index`).
    #[error("{}: record {index}: {reason}", file.display())]
    Record {
        /// The data file.
        file: PathBuf,
        /// The record's index (0-based).
        index: usize,
        /// What is wrong with it.
        reason: String,
    },

    /// Input given to a function or command that it cannot accept.
    #[error("{what}: {reason}")]
    Input {
        /// The argument or input ("height", "--init-noise").
        what: String,
        /// What is wrong, with the value found.
        reason: String,
    },

    /// NaN or infinite values where only finite ones make sense: a weight, an input tensor, a
    /// model's output during sampling.
    #[error("{subject}: {count} non-finite value(s) (NaN or infinity), the first at index {first}: {value}")]
    NonFinite {
        /// What holds them: `file: tensor`, or `sampling step 3 of 50: unet output`.
        subject: String,
        /// How many of its values are not finite.
        count: usize,
        /// The flat index of the first one.
        first: usize,
        /// Its value.
        value: f64,
    },

    /// A custom op failed on a device.
    #[error("op {op} on {device}: {reason}")]
    Op {
        /// The op's name.
        op: String,
        /// The device ("cpu", "cuda", "wgpu").
        device: String,
        /// What went wrong.
        reason: String,
    },

    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn preview(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    s
}

impl Error {
    /// An IO error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    /// A config error on `file`'s `key`.
    pub fn config(file: impl Into<PathBuf>, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// A bad-input error on argument `what`.
    pub fn input(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Input {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that `value` is finite and > 0; otherwise the bad-input error on `what`
/// ("must be positive, got {value}").
pub fn positive(what: &str, value: f64) -> Result<()> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(Error::input(what, format!("must be positive, got {value}")))
    }
}

/// Checks that `got`, the shape of `what`, is `expected`, the shape of `like`; otherwise the
/// bad-input error on `what` ("expected the shape of {like} {expected:?}, got {got:?}").
pub fn same_shape(what: &str, got: &[usize], like: &str, expected: &[usize]) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    Err(Error::input(
        what,
        format!("expected the shape of {like} {expected:?}, got {got:?}"),
    ))
}

/// The value `name` stands for among `names` (`(name, value)` pairs); otherwise the bad-input
/// error on `what` that lists them ("expected a, b or c, got {name:?}").
pub fn one_of<T: Copy>(what: &str, name: &str, names: &[(&str, T)]) -> Result<T> {
    if let Some(&(_, value)) = names.iter().find(|(n, _)| *n == name) {
        return Ok(value);
    }
    let list: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
    let expected = match list.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => list.concat(),
    };
    Err(Error::input(what, format!("expected {expected}, got {name:?}")))
}
