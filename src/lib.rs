//! walcast: committed Postgres changes in, Redis events out.
//!
//! ```text
//! Postgres ──pgoutput──▶ replication ──▶ pgoutput ──▶ change ──▶ encode ──▶ publish ──▶ Redis
//!    ▲                    (CopyBoth)     (decode)    (assemble)  (JSON)     (pipeline)
//!    └──────── standby status: acknowledged LSN ◀───────────────────────────────┘
//! ```
//!
//! | module | job |
//! |---|---|
//! | [`replication`] | the walsender conversation: connect, auth, TLS, slot, stream, status updates |
//! | [`pgoutput`] | bytes in, typed messages out; no I/O |
//! | [`change`] | relation cache, transaction assembly, the [`change::Change`] record |
//! | [`catalog`] | what the daemon knows of the database's types |
//! | [`encode`] | column values and changes → JSON |
//! | [`subscription`] | the registry of who listens, filters, and who may see each change |
//! | [`rls`] | batched Row Level Security checks on the committed rows, and the SQL they call |
//! | [`channels`] | private channels: RLS on `realtime.messages` for joins, writes and the messages of private topics, many subjects per call |
//! | [`control`] | subscription requests from gateways, validated and answered over the bus |
//! | [`messages`] | Broadcast from Database: `realtime.messages` rows → room broadcasts; its daily partitions |
//! | [`pool`] | the pooled SQL connections (catalog, filters, RLS checks) |
//! | [`bus`] | the Redis contract: channel names, message envelope, room messages between gateways; the Redis it runs on, one server or a cluster ([`bus::server`]) |
//! | [`publish`] | pipelined PUBLISH (SPUBLISH on a cluster) and the acknowledged LSN |
//! | [`daemon`] | wiring and supervision: stream → decode → assemble → encode → publish → ack; the slot's lock (hot standby) |
//! | [`metrics`](crate::metrics) | metric names, the Prometheus recorder, the slot's retained WAL |
//! | [`gateway`] | `walcast gateway`: Phoenix Channels over WebSocket for Supabase clients (Postgres Changes, Broadcast, Presence); talks to the bus only |
//! | [`admin`] | the admin HTTP server: `/metrics`, `/health`, `/ready` |
//! | [`config`] | settings from file, environment and flags |
//! | [`check`] | `walcast check`: is a database, its slot and Redis ready? findings with fixes |
//! | [`setup`] | `walcast setup`: applies `sql/` (publication, role, auth helpers) |

pub mod admin;
pub mod bus;
pub mod catalog;
pub mod change;
pub mod channels;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod encode;
pub mod gateway;
pub mod lsn;
pub mod messages;
pub mod metrics;
pub mod pgoutput;
pub mod pool;
pub mod publish;
pub mod replication;
pub mod rls;
pub mod setup;
pub mod shutdown;
pub mod subscription;
