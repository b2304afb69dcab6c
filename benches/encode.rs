//! Encoding changes as published: the Supabase `data` object
//! (`encode::PayloadEncoder`) inside the bus envelope
//! (`bus::write_change_event`), and the whole per-change path of the
//! replication task (decode → assemble → encode → one `Bytes` per message).
//!
//! `cargo bench --bench encode`: time per message and MB/s of JSON out.
//! Instruction counts for comparing commits: `bench/callgrind`.

// A benchmark's fixtures are known-good; a broken one should panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod fixtures;

use bytes::Bytes;
use fixtures::{Case, keep};
use walcast::bus;
use walcast::change::{Change, Event};
use walcast::encode::PayloadEncoder;

/// Supabase's default `max_record_bytes` (1 MiB), as the daemon uses it.
const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// What the daemon does per change once it has a `Change`.
fn event(out: &mut Vec<u8>, payload: &mut PayloadEncoder, change: &Change) -> Bytes {
    out.clear();
    bus::write_change_event(out, change.commit_lsn, change.seq, change.xid, |out| {
        payload.write_data(out, change);
    });
    Bytes::copy_from_slice(out)
}

fn output_len(changes: &[Change]) -> u64 {
    let mut payload = PayloadEncoder::new(MAX_RECORD_BYTES);
    let mut out = Vec::new();
    let events: Vec<Bytes> = changes
        .iter()
        .map(|c| event(&mut out, &mut payload, c))
        .collect();
    fixtures::average_len(&events)
}

/// `data` only, into a reused buffer.
fn data_case(name: &'static str, changes: Vec<Change>) -> Case {
    let mut payload = PayloadEncoder::new(MAX_RECORD_BYTES);
    let mut out = Vec::with_capacity(1 << 16);
    let bytes = {
        let mut total = 0;
        for c in &changes {
            out.clear();
            payload.write_data(&mut out, c);
            total += out.len();
        }
        (total / changes.len()) as u64
    };
    let mut i = 0;
    Case {
        name,
        bytes,
        run: Box::new(move || {
            out.clear();
            payload.write_data(&mut out, &changes[i % changes.len()]);
            i += 1;
            keep(out.len());
        }),
    }
}

/// The envelope and `data`, copied into its own `Bytes` as the daemon does.
fn event_case(name: &'static str, changes: Vec<Change>) -> Case {
    let bytes = output_len(&changes);
    let mut payload = PayloadEncoder::new(MAX_RECORD_BYTES);
    let mut out = Vec::with_capacity(1 << 16);
    let mut i = 0;
    Case {
        name,
        bytes,
        run: Box::new(move || {
            keep(event(&mut out, &mut payload, &changes[i % changes.len()]));
            i += 1;
        }),
    }
}

/// Frame in, message out: decode, assemble, encode.
fn path_case(name: &'static str, frames: Vec<Bytes>) -> Case {
    let bytes = output_len(&fixtures::changes(&frames));
    let (mut decoder, mut assembler) = fixtures::assembler();
    let mut payload = PayloadEncoder::new(MAX_RECORD_BYTES);
    let mut out = Vec::with_capacity(1 << 16);
    let mut i = 0;
    Case {
        name,
        bytes,
        run: Box::new(move || {
            let frame = frames[i % frames.len()].clone();
            i += 1;
            let message = decoder.decode(frame).expect("fixture frame decodes");
            match assembler.apply(message).expect("fixture message applies") {
                Event::Change(change) => keep(event(&mut out, &mut payload, &change)),
                other => panic!("expected a change, got {other:?}"),
            }
        }),
    }
}

fn main() {
    let items = fixtures::changes(&fixtures::items_inserts());
    let wide_toast = fixtures::changes(&fixtures::wide_updates(false));
    let wide_jsonb = fixtures::changes(&fixtures::wide_updates(true));
    fixtures::main(
        "encode",
        vec![
            data_case("data_insert_items", items.clone()),
            event_case("event_insert_items", items),
            event_case("event_update_wide_unchanged_toast", wide_toast),
            event_case("event_update_wide_with_jsonb", wide_jsonb),
            path_case("path_insert_items", fixtures::items_inserts()),
            path_case("path_update_wide_with_jsonb", fixtures::wide_updates(true)),
        ],
    );
}
