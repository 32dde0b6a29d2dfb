//! Safetensors files, one or a sharded set: their headers, and the bytes of one tensor.
//!
//! Headers are parsed by the `safetensors` crate from a memory map of each file (its parser
//! validates offsets against the file's length, and the map touches only the header's pages).
//! A tensor's data is then read with a positioned read of exactly its byte range, converted to
//! f64 chunk by chunk: a 7B checkpoint with four matched tensors reads those four, and a file
//! truncated under a running job is an I/O error for one case instead of a SIGBUS for the run.
//! Each file's SHA-256 is computed only when a report asks for it, and only for files that
//! hold a matched tensor (hashing streams the file through a small buffer).

use super::WeightsError;
use crate::case::DType;
use crate::worker::tensor::{self, HostTensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The index file a sharded checkpoint folder holds (Hugging Face's name).
pub const INDEX: &str = "model.safetensors.index.json";

/// One safetensors file of a checkpoint: where its data starts and its tensors' places.
#[derive(Debug)]
pub struct ShardFile {
    pub path: PathBuf,
    pub size: u64,
    /// Bytes before the data section: the 8-byte header length and the header.
    data_start: u64,
    metadata: Metadata,
    sha256: OnceLock<Result<String, String>>,
}

/// Where one stored tensor lives: its file, dtype, shape and byte range.
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub file: Arc<ShardFile>,
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    offsets: (usize, usize),
}

/// A checkpoint: one safetensors file, or the shards an index names.
#[derive(Debug)]
pub struct Checkpoint {
    /// What the matrix named (a file, or the folder holding an index or one file).
    pub path: PathBuf,
    pub files: Vec<Arc<ShardFile>>,
    /// Every tensor by name, in name order.
    pub tensors: BTreeMap<String, TensorRef>,
}

/// The report's record of one file: enough to tie a run to its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    /// Absent for a shard no matched tensor lives in (it is not read at all) or when hashing
    /// failed (`sha256_error` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_error: Option<String>,
    /// Whether a matched tensor is stored in this file.
    pub read: bool,
}

/// Whether a stored dtype converts exactly to f64 (and so to any case dtype by one rounding).
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// The spelling a stored dtype has in safetensors headers (`F32`, `BF16`, `I8`, ...).
pub fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl ShardFile {
    /// Map `path` and parse its header (the map is dropped once the header is read).
    pub fn open(path: &Path) -> Result<ShardFile, WeightsError> {
        let file = File::open(path).map_err(|e| WeightsError::Missing {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let corrupt = |why: String| WeightsError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        if size < 8 {
            return Err(corrupt(format!(
                "{size} bytes: shorter than a safetensors header's length prefix"
            )));
        }
        // SAFETY: the map is read-only and lives only while the header is parsed; a file
        // changed under it meanwhile can at worst fail the parse.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| corrupt(e.to_string()))?;
        let (n, metadata) = SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
        Ok(ShardFile {
            path: path.to_path_buf(),
            size,
            data_start: 8 + n as u64,
            metadata,
            sha256: OnceLock::new(),
        })
    }

    fn refs(self: &Arc<Self>) -> Vec<TensorRef> {
        self.metadata
            .tensors()
            .into_iter()
            .map(|(name, info): (String, &TensorInfo)| TensorRef {
                file: Arc::clone(self),
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                offsets: info.data_offsets,
            })
            .collect()
    }

    /// The file's SHA-256 as hex, computed once (streamed: the file is not held in memory).
    pub fn sha256(&self) -> Result<String, String> {
        self.sha256
            .get_or_init(|| {
                use sha2::{Digest, Sha256};
                use std::io::Read;
                let mut f = File::open(&self.path).map_err(|e| e.to_string())?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf).map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Ok(format!("{:x}", h.finalize()))
            })
            .clone()
    }
}

impl Checkpoint {
    /// Open `path`: a `.safetensors` file, or a folder holding `model.safetensors.index.json`
    /// (its shards) or exactly one `.safetensors` file.
    pub fn open(path: &Path) -> Result<Checkpoint, WeightsError> {
        let missing = |why: &str| WeightsError::Missing {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let shard_paths: Vec<PathBuf> = if path.is_dir() {
            let index = path.join(INDEX);
            if index.is_file() {
                shards_of_index(&index)?
                    .into_iter()
                    .map(|f| path.join(f))
                    .collect()
            } else {
                let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| missing(&e.to_string()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                found.sort();
                match found.len() {
                    1 => found,
                    0 => return Err(missing(&format!("the folder holds no .safetensors file and no {INDEX}"))),
                    n => return Err(missing(&format!("the folder holds {n} .safetensors files and no {INDEX} saying which are shards of one checkpoint"))),
                }
            }
        } else if path.exists() {
            vec![path.to_path_buf()]
        } else {
            return Err(missing("no such file or folder"));
        };
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for p in shard_paths {
            let f = Arc::new(ShardFile::open(&p)?);
            for t in f.refs() {
                tensors.insert(t.name.clone(), t);
            }
            files.push(f);
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            files,
            tensors,
        })
    }

    /// Each file's record; hashed only where `read` says a matched tensor lives.
    pub fn records(&self, read: &dyn Fn(&Path) -> bool) -> Vec<FileRecord> {
        self.files
            .iter()
            .map(|f| {
                let read = read(&f.path);
                let sha = read.then(|| f.sha256());
                FileRecord {
                    path: f.path.display().to_string(),
                    size: f.size,
                    sha256: sha.clone().and_then(Result::ok),
                    sha256_error: sha.and_then(Result::err),
                    read,
                }
            })
            .collect()
    }
}

/// The shard file names an index's `weight_map` points to, each once, in order.
fn shards_of_index(index: &Path) -> Result<Vec<String>, WeightsError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let corrupt = |why: String| WeightsError::Corrupt {
        path: index.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(index).map_err(|e| corrupt(e.to_string()))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(corrupt("its weight_map names no shard".into()));
    }
    if let Some(bad) = files
        .iter()
        .find(|f| f.contains('/') || f.contains("..") || f.is_empty())
    {
        return Err(corrupt(format!(
            "shard `{bad}` is not a file name in the index's folder"
        )));
    }
    Ok(files)
}

impl TensorRef {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The stored values as f64 (exact for every float dtype), read from the file's byte range
    /// in chunks so that only the f64 copy is held.
    pub fn read(&self) -> Result<HostTensor, String> {
        if !is_float(self.dtype) {
            return Err(format!(
                "{} is stored as {}, which no backend takes as a base weight",
                self.name,
                dtype_name(self.dtype)
            ));
        }
        let width = self.dtype.bitsize() / 8;
        let n = self.elements();
        let (start, end) = self.offsets;
        if end - start != n * width {
            return Err(format!(
                "{}: {} bytes stored for {n} elements of {}",
                self.name,
                end - start,
                dtype_name(self.dtype)
            ));
        }
        let file = File::open(&self.file.path)
            .map_err(|e| format!("{}: {e}", self.file.path.display()))?;
        let dtype = match self.dtype {
            Dtype::F64 => DType::F64,
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            _ => DType::Bf16,
        };
        let offset = self.file.data_start + start as u64;
        tensor::read_tensor(&file, offset, dtype, self.shape.clone()).map_err(|e| {
            format!(
                "reading {} from {}: {e}",
                self.name,
                self.file.path.display()
            )
        })
    }
}
