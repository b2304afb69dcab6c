#![allow(clippy::unwrap_used, clippy::expect_used)]
//! walcast integration tests: real Postgres and Redis servers started per
//! test (see `support`), and the walcast binary as a child process.

mod admin;
mod check;
mod clients;
mod clients_private;
mod clients_rooms;
mod cluster;
mod db_broadcast;
mod delivery;
mod failover;
mod faults;
mod filters;
mod firehose;
mod gateway;
mod gateway_limits;
mod harness;
mod hostile;
mod private;
mod private_rls;
mod rls;
mod rls_image;
mod rooms;
mod startup;
mod subscriptions;
mod support;
mod values;
