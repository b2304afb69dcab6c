//! Change events, written by hand: this runs once per change (or once per
//! gateway per change), so nothing is formatted through `format!`.

use super::VERSION;
use crate::lsn::Lsn;

/// Writes one change event: `{"v":1,"lsn":"0/16B3748","seq":0,"xid":750,"data":{...}}`.
///
/// `lsn` is the commit LSN of the change's transaction and `seq` its
/// position in it: the pair is unique and increases in commit order, so a
/// consumer drops anything at or below the last pair it processed.
/// `write_data` writes the Supabase `data` object.
pub fn write_change_event(
    out: &mut Vec<u8>,
    lsn: Lsn,
    seq: u32,
    xid: u32,
    write_data: impl FnOnce(&mut Vec<u8>),
) {
    // Built by hand: this runs once per change.
    out.extend_from_slice(b"{\"v\":");
    push_number(out, u64::from(VERSION));
    out.extend_from_slice(b",\"lsn\":\"");
    push_hex(out, lsn.0 >> 32);
    out.push(b'/');
    push_hex(out, lsn.0 & 0xFFFF_FFFF);
    out.extend_from_slice(b"\",\"seq\":");
    push_number(out, u64::from(seq));
    out.extend_from_slice(b",\"xid\":");
    push_number(out, u64::from(xid));
    out.extend_from_slice(b",\"data\":");
    write_data(out);
    out.push(b'}');
}

/// Writes one authorized change event for a gateway:
/// `{"v":1,"type":"change","ids":["s1","s2"],"sys":"7450….1","lsn":"0/16B3748","seq":0,"data":{...}}`.
/// `ids` are the gateway's subscriptions allowed to see it; `data` (already
/// JSON) is what they see. `sys` is `<system identifier>.<timeline>`:
/// (`sys`, `lsn`, `seq`) tells a gateway which events it already delivered
/// when a daemon that took over sends them again.
pub fn write_gateway_event<'a>(
    out: &mut Vec<u8>,
    ids: impl IntoIterator<Item = &'a str>,
    system: &str,
    lsn: Lsn,
    seq: u32,
    data: &[u8],
) {
    out.extend_from_slice(b"{\"v\":");
    push_number(out, u64::from(VERSION));
    out.extend_from_slice(b",\"type\":\"change\",\"ids\":[");
    for (i, id) in ids.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        crate::encode::write_json_string(out, id.as_bytes());
    }
    out.extend_from_slice(b"],\"sys\":");
    crate::encode::write_json_string(out, system.as_bytes());
    out.extend_from_slice(b",\"lsn\":\"");
    push_hex(out, lsn.0 >> 32);
    out.push(b'/');
    push_hex(out, lsn.0 & 0xFFFF_FFFF);
    out.extend_from_slice(b"\",\"seq\":");
    push_number(out, u64::from(seq));
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
}

fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Upper-case hex without leading zeros, as Postgres prints LSN halves.
fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[(n & 0xF) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_events_list_the_allowed_subscriptions() {
        let mut out = Vec::new();
        write_gateway_event(
            &mut out,
            ["s1", "s\"2"],
            "745",
            Lsn(0x1_0000_0010),
            7,
            b"{}",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"v":1,"type":"change","ids":["s1","s\"2"],"sys":"745","lsn":"1/10","seq":7,"data":{}}"#
        );
    }

    #[test]
    fn event_envelope_wraps_the_data_object() {
        let mut out = Vec::new();
        write_change_event(&mut out, Lsn(0x16B3748), 3, 750, |o| {
            o.extend_from_slice(b"{}")
        });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"v":1,"lsn":"0/16B3748","seq":3,"xid":750,"data":{}}"#
        );
        let mut out = Vec::new();
        write_change_event(&mut out, Lsn(u64::MAX), u32::MAX, 0, |o| {
            o.extend_from_slice(b"{}")
        });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                r#"{{"v":1,"lsn":"{}","seq":4294967295,"xid":0,"data":{{}}}}"#,
                Lsn(u64::MAX)
            )
        );
    }
}
