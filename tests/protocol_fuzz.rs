//! Property tests of the worker protocol's reader (the runner's side of a worker's stdout):
//! whatever a worker writes, `read_frame` answers with a frame, the end of the stream or an
//! error, never a panic and never an allocation beyond the limit the runner sets; the tensors
//! of a frame that reads are split and decoded without a panic too. Inputs: arbitrary bytes,
//! valid replies mutated byte by byte and cut short, and headers whose lengths and shapes are
//! arbitrary numbers up to 2^64 (5,000 cases each by default; PROPTEST_CASES changes it).

use peft_compat::case::DType;
use peft_compat::worker::protocol::{self, Reply, TensorHeader};
use peft_compat::worker::tensor::HostTensor;
use proptest::prelude::*;
use std::io::BufReader;

/// The most a frame may carry in these tests: 1 MiB, as the runner sets per case.
const LIMIT: usize = 1 << 20;

/// Read every frame of `bytes` until the end or an error, as the runner's reader thread does;
/// split and decode each frame's tensors. Returns how many frames were read.
fn read_all(bytes: &[u8]) -> usize {
    let mut r = BufReader::with_capacity(64, bytes);
    let mut frames = 0;
    loop {
        match protocol::read_frame::<Reply>(&mut r, protocol::reply_bytes, || LIMIT) {
            Ok(Some(f)) => {
                assert!(f.payload.len() <= LIMIT, "payload over the limit");
                assert!(
                    f.stray.iter().map(String::len).sum::<usize>() <= protocol::MAX_STRAY,
                    "stray output kept beyond its bound"
                );
                if let Reply::Outputs { tensors, .. } = &f.message {
                    let _ = protocol::split_payload(tensors, &f.payload);
                }
                frames += 1;
            }
            Ok(None) | Err(_) => return frames,
        }
    }
}

/// A valid `outputs` reply with `n` tensors of small random shapes.
fn valid_reply(shapes: &[(usize, usize)]) -> Vec<u8> {
    let payload: Vec<protocol::Encoded> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(r, c))| {
            let t = HostTensor::new(vec![r, c], (0..r * c).map(|v| v as f64 * 0.5).collect());
            protocol::encode(&format!("t{i}"), &t, DType::F16)
        })
        .collect();
    let reply = Reply::Outputs {
        compute_ms: 1.0,
        tensors: payload.iter().map(|e| e.header.clone()).collect(),
    };
    let mut buf = b"a library's banner\n".to_vec();
    protocol::write_frame(&mut buf, &reply, &payload).unwrap();
    buf
}

proptest! {
    // 5,000 cases each unless PROPTEST_CASES says otherwise (a literal `cases` would override it).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        read_all(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_the_magic_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut b = protocol::MAGIC.as_bytes().to_vec();
        b.extend(bytes);
        read_all(&b);
    }

    #[test]
    fn valid_replies_mutated_or_cut_never_panic(
        shapes in proptest::collection::vec((1usize..6, 1usize..6), 1..4),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut b = valid_reply(&shapes);
        prop_assert_eq!(read_all(&b), 1);
        for (at, byte) in flips {
            let i = at.index(b.len());
            b[i] = byte;
        }
        read_all(&b);
        b.truncate(cut.index(b.len() + 1));
        read_all(&b);
    }

    #[test]
    fn headers_with_arbitrary_lengths_and_shapes_never_panic_or_allocate(
        tensors in proptest::collection::vec(
            (proptest::collection::vec(any::<usize>(), 0..4), any::<usize>()), 0..4),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let headers: Vec<TensorHeader> = tensors
            .into_iter()
            .enumerate()
            .map(|(i, (shape, bytes))| TensorHeader {
                name: format!("t{i}"),
                dtype: DType::F32,
                shape,
                bytes,
                file: None,
            })
            .collect();
        let reply = Reply::Outputs { compute_ms: 0.0, tensors: headers };
        let mut b = Vec::new();
        protocol::write_frame(&mut b, &reply, &[]).unwrap();
        b.extend(body);
        read_all(&b);
    }
}

/// A line without an end is read in bounded pieces: 64 MiB of `x` with no newline, then a
/// valid frame, reads as that frame with the junk counted, not kept.
#[test]
fn an_endless_line_is_not_kept() {
    let mut b = vec![b'x'; 64 << 20];
    b.push(b'\n');
    b.extend(valid_reply(&[(2, 2)]));
    let mut r = BufReader::new(&b[..]);
    let f = protocol::read_frame::<Reply>(&mut r, protocol::reply_bytes, || LIMIT)
        .unwrap()
        .unwrap();
    assert_eq!(f.stray, vec!["a library's banner".to_string()]);
}
