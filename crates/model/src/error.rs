//! The model crate's error type. Every message names the file, tensor or key involved, so a
//! user can find the bad byte without a debugger.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint or keeping a workspace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What memwise was doing ("reading", "writing", ...).
        action: &'static str,
        /// The file or folder involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A folder holds no weights memwise recognizes.
    #[error(
        "{} holds no model.safetensors, model.safetensors.index.json, pytorch_model.bin or \
         pytorch_model.bin.index.json",
        folder.display()
    )]
    NoWeights {
        /// The model folder.
        folder: PathBuf,
    },
    /// `config.json` is missing, is not JSON, or has a key of the wrong type.
    #[error("{}: {reason}", file.display())]
    Config {
        /// The config file.
        file: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// A safetensors header declares more bytes than memwise accepts.
    #[error("{}: header of {size} bytes exceeds the {limit}-byte limit", file.display())]
    HeaderTooLarge {
        /// The safetensors file.
        file: PathBuf,
        /// The size the file declares.
        size: u64,
        /// The largest header memwise reads.
        limit: u64,
    },
    /// A safetensors header is not the JSON the format prescribes.
    #[error("{}: invalid safetensors header: {reason}", file.display())]
    InvalidHeader {
        /// The safetensors file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// One tensor's entry is inconsistent: bad dtype, shape, offsets or size.
    #[error("{}: tensor {tensor}: {reason}", file.display())]
    InvalidTensor {
        /// The file that describes the tensor.
        file: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// Two tensors of one file claim the same bytes.
    #[error("{}: tensors {tensor} and {other} overlap", file.display())]
    OverlappingTensors {
        /// The file.
        file: PathBuf,
        /// The tensor that starts inside the other.
        tensor: String,
        /// The tensor it overlaps.
        other: String,
    },
    /// A file ends before the bytes its header promises.
    #[error(
        "{}: truncated: tensor {tensor} needs bytes up to {needed}, the file has {actual}",
        file.display()
    )]
    Truncated {
        /// The short file.
        file: PathBuf,
        /// The first tensor that does not fit.
        tensor: String,
        /// The length the tensor needs.
        needed: u64,
        /// The file's length.
        actual: u64,
    },
    /// A shard index (`*.index.json`) is malformed.
    #[error("{}: invalid index: {reason}", file.display())]
    InvalidIndex {
        /// The index file.
        file: PathBuf,
        /// What is wrong, naming the key or tensor.
        reason: String,
    },
    /// An index names a shard outside the model folder.
    #[error(
        "{}: tensor {tensor} points to shard {shard:?}, which resolves outside the model folder ({reason})",
        index.display()
    )]
    ShardOutsideFolder {
        /// The index file.
        index: PathBuf,
        /// The tensor whose shard is refused.
        tensor: String,
        /// The shard name as the index spells it.
        shard: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An index names a shard that does not exist.
    #[error("{}: tensor {tensor} is in shard {}, which does not exist", index.display(), shard.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The first tensor listed in the missing shard.
        tensor: String,
        /// The missing shard.
        shard: PathBuf,
    },
    /// An index lists a tensor that its shard does not hold.
    #[error("{}: tensor {tensor} is listed in the index but absent from shard {}", index.display(), shard.display())]
    TensorNotInShard {
        /// The index file.
        index: PathBuf,
        /// The absent tensor.
        tensor: String,
        /// The shard that lacks it.
        shard: PathBuf,
    },
    /// The same tensor name appears in two files.
    #[error("tensor {tensor} appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        /// The tensor's name.
        tensor: String,
        /// The first file that holds it.
        first: PathBuf,
        /// The second file that holds it.
        second: PathBuf,
    },
    /// A PyTorch file saved in the pre-1.6 (non-zip) format.
    #[error(
        "{}: legacy (non-zip) PyTorch format is unsupported; re-save it with a current torch \
         (torch.save(torch.load(path), path)) or convert it to safetensors",
        file.display()
    )]
    LegacyTorchFormat {
        /// The legacy file.
        file: PathBuf,
    },
    /// A PyTorch zip archive is malformed or uses something memwise does not read.
    #[error("{}: {reason}", file.display())]
    InvalidTorchArchive {
        /// The `.bin` file.
        file: PathBuf,
        /// What is wrong, naming the entry or tensor.
        reason: String,
    },
    /// The pickle inside a PyTorch file does something torch's `save` never writes.
    #[error("{}: pickle byte {offset}: {reason}", file.display())]
    UnsupportedPickle {
        /// The `.bin` file.
        file: PathBuf,
        /// The byte offset of the refused opcode inside `data.pkl`.
        offset: usize,
        /// What was refused.
        reason: String,
    },
    /// A tensor or layer name that the checkpoint does not hold.
    #[error("no tensor or layer named {name} in {}", folder.display())]
    NotFound {
        /// The name asked for.
        name: String,
        /// The model folder.
        folder: PathBuf,
    },
    /// A dtype conversion that memwise does not do (integers are passed through, never cast).
    #[error("tensor {tensor}: cannot convert {from} to {to}")]
    Conversion {
        /// The tensor.
        tensor: String,
        /// Its stored dtype.
        from: String,
        /// The dtype asked for.
        to: String,
    },
    /// candle refused a tensor (its device could not allocate it, for instance).
    #[error("tensor {tensor}: candle: {source}")]
    Candle {
        /// The tensor.
        tensor: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A workspace file's checksum does not match its manifest.
    #[error("{}: checksum {actual} does not match the manifest's {expected}", file.display())]
    ChecksumMismatch {
        /// The workspace file.
        file: PathBuf,
        /// The manifest's checksum.
        expected: String,
        /// The file's checksum now.
        actual: String,
    },
    /// A workspace manifest is unreadable or belongs to another model.
    #[error("{}: {reason}", manifest.display())]
    Workspace {
        /// The manifest.
        manifest: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Not enough free disk for a workspace write; nothing was written.
    #[error(
        "not enough disk space in {}: {needed} bytes needed, {available} available",
        dir.display()
    )]
    InsufficientDisk {
        /// The workspace folder.
        dir: PathBuf,
        /// Bytes the write needs.
        needed: u64,
        /// Bytes free for this user.
        available: u64,
    },
}

/// The model crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidTensor`].
    pub(crate) fn tensor(
        file: impl Into<PathBuf>,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidTensor {
            file: file.into(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }
}
