//! Large request tensors in shared memory: an LLM-sized weight is encoded into a memfd once
//! per dtype and every worker that can (`files` in its hello) reads it in place, instead of
//! receiving hundreds of MB through its pipe for every case (protocol.rs: a tensor's `file`).
//!
//! A file lives as long as the rounded weight it holds (the cache's entry for that shape and
//! dtype): it is found again by that `Arc`, and closed once the `Arc` is gone. The kernel frees
//! a memfd when the last holder closes or unmaps it, so a runner killed mid-run leaves nothing
//! behind (unlike a file under /dev/shm).

use crate::case::DType;
use crate::worker::protocol;
use crate::worker::tensor::HostTensor;
use std::fs::File;
use std::sync::{Arc, Mutex, Weak};

struct Entry {
    tensor: Weak<HostTensor>,
    dtype: DType,
    path: String,
    _file: File,
}

static FILES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The path (`/proc/<pid>/fd/<n>`) of a memfd holding `t`'s values in `dtype`, written on
/// first use; `None` for a tensor under [`protocol::FILE_MIN_BYTES`] (a file costs the worker
/// an open) or where no memfd can be made (the
/// tensor then travels in the payload).
pub fn file_for(t: &Arc<HostTensor>, dtype: DType) -> Option<String> {
    if t.data.len() * dtype.size() < protocol::FILE_MIN_BYTES {
        return None;
    }
    let mut files = FILES.lock().unwrap_or_else(|p| p.into_inner());
    // A dead tensor's file goes; a live one's address cannot be reused, so `ptr_eq` finds it.
    files.retain(|e| e.tensor.strong_count() > 0);
    let weak = Arc::downgrade(t);
    if let Some(e) = files
        .iter()
        .find(|e| e.dtype == dtype && e.tensor.ptr_eq(&weak))
    {
        return Some(e.path.clone());
    }
    let (file, path) = protocol::tensor_file(t, dtype).ok()?;
    files.push(Entry {
        tensor: weak,
        dtype,
        path: path.clone(),
        _file: file,
    });
    Some(path)
}
