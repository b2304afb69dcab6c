//! pgoutput decoding: one `XLogData` payload in, one typed message out.
//!
//! `cargo bench --bench pgoutput_decode`: time per message and MB/s of
//! frames. Instruction counts for comparing commits: `bench/callgrind`.

// A benchmark's fixtures are known-good; a broken one should panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod fixtures;

use bytes::Bytes;
use fixtures::{Case, keep};
use walcast::pgoutput::Decoder;

fn decode_case(name: &'static str, frames: Vec<Bytes>) -> Case {
    let bytes = fixtures::average_len(&frames);
    let mut decoder = Decoder::new();
    let mut i = 0;
    Case {
        name,
        bytes,
        run: Box::new(move || {
            let frame = frames[i % frames.len()].clone();
            i += 1;
            keep(decoder.decode(frame).expect("fixture frame decodes"));
        }),
    }
}

fn main() {
    fixtures::main(
        "pgoutput_decode",
        vec![
            decode_case("insert_items", fixtures::items_inserts()),
            decode_case("update_wide_unchanged_toast", fixtures::wide_updates(false)),
            decode_case("update_wide_with_jsonb", fixtures::wide_updates(true)),
        ],
    );
}
