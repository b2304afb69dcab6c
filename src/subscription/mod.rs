//! Who listens: the registry of live subscriptions and how a change is
//! matched to them.

mod compile;
mod deliver;
mod evaluate;
pub mod filter;
mod key;
mod list;
mod registry;
mod server;

pub use compile::{Column, CompileError, compile};
pub use deliver::{Delivery, Denial, Error as DeliverError, authorize};
pub use evaluate::{Canonical, CompiledFilter, EqualityKey, Verdict, evaluate, evaluate_all};
pub use filter::{Filter, FilterError, IsTarget, Op, Operand};
pub use registry::{Candidates, Entry, Events, PrivateMember, Registry, Shared};
pub use server::{FilterFailure, evaluate_on_server};
