//! Fuzzes the pgoutput decoder: no input may make it panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walcast::pgoutput::{Decoder, Message, Value};

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);

    // The whole input as one frame, to a fresh decoder.
    let _ = Decoder::new().decode(input.clone());

    // The input as a sequence of frames, each preceded by a one-byte length,
    // fed to one decoder so that the StreamStart..StreamStop state carries over.
    let mut decoder = Decoder::new();
    let mut rest = input;
    while let Some((&len, _)) = rest.split_first() {
        let len = usize::from(len).min(rest.len() - 1);
        let frame = rest.slice(1..=len);
        rest = rest.slice(len + 1..);
        if let Ok(Message::Insert(insert)) = decoder.decode(frame.clone()) {
            // Values are zero-copy slices of their frame.
            let range = frame.as_ptr_range();
            for value in insert.new.0 {
                if let Value::Text(b) | Value::Binary(b) = value {
                    assert!(b.is_empty() || range.contains(&b.as_ptr()));
                }
            }
        }
    }
});
