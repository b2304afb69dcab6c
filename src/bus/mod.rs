//! The Redis contract between the daemon and the gateways (or any other
//! consumer): channel and key names, and versioned messages; and the
//! Redis it runs on, one server or a cluster ([`server`]). `docs/bus.md`
//! is its prose form; change both together.

mod control;
mod event;
mod names;
pub mod room;
pub mod server;

pub use control::{
    Access, Binding, CHANNEL_FIELD_PREFIX, ChannelRegistration, Control, ControlOp, PrivateChannel,
    Replay, Reply, Subscription, WriteCheck, channel_field,
};
pub use event::{write_change_event, write_gateway_event};
pub use names::{Names, room_key, room_topic};

/// Version of the message format, the `v` field of every message.
pub const VERSION: u32 = 1;
