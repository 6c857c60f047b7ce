//! One call per side from an admitted control session to a finished
//! migration: the entry points a VMM embedding ferry uses.
//!
//! The control plane (`ferry_control::handshake::request` at the source,
//! `serve_destination` at the destination) produces an `Admitted` session;
//! these functions open (or accept) its data streams, derive the keys from
//! its [`KeyGrant`](ferry_control::handshake::KeyGrant), and run
//! [`migrate_source`] / [`migrate_destination`] with the caller's progress
//! callback and cancel switch ([`Hooks`]). Both block until the migration
//! ends; run them on a thread of their own and use a clone of the hooks to
//! watch or cancel.

use std::net::{IpAddr, SocketAddr, TcpListener};

use ferry_control::handshake::{Admitted, DestinationSession, SourceSession};

use crate::crypto::SessionKeys;
use crate::dirty::DirtyTracker;
use crate::guest::GuestControl;
use crate::memory::GuestMemory;
use crate::migrate::{migrate_destination, migrate_source, DestReport, MigrateError, MigrationConfig, SourceReport};
use crate::progress::Hooks;
use crate::transport::{accept_proven, connect_streams};

fn agree(session: &Admitted, cfg: &MigrationConfig) -> Result<(), MigrateError> {
    let offer = session.offer();
    if offer.streams != cfg.streams || offer.integrity != cfg.integrity {
        return Err(MigrateError::Config(format!(
            "the admitted offer has {} streams and {} integrity, this configuration {} and {}",
            offer.streams,
            offer.integrity,
            cfg.streams,
            cfg.integrity.as_str()
        )));
    }
    Ok(())
}

/// The source side: connects `cfg.streams` data streams to the
/// destination's data port at `dest_ip` (the address its control session
/// reached) and migrates the guest. On an error before the commit point the
/// guest runs here again; see [`migrate_source`].
pub fn run_source(
    mem: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    guest: &mut dyn GuestControl,
    session: &SourceSession,
    dest_ip: IpAddr,
    cfg: &MigrationConfig,
    hooks: &Hooks,
) -> Result<SourceReport, MigrateError> {
    agree(session, cfg)?;
    if hooks.is_cancelled() {
        return Err(MigrateError::Cancelled);
    }
    let data = SocketAddr::new(dest_ip, session.data_port());
    let conns = connect_streams(data, cfg.streams, cfg.io_timeout)?;
    let keys = SessionKeys::from_grant(session.key_grant());
    migrate_source(mem, tracker, guest, conns, &keys, cfg, hooks)
}

/// The destination side: accepts the admitted migration's data streams on
/// `data` (the listener its acceptance announced) and receives the guest
/// into `mem`, resuming it through `guest` at the commit; see
/// [`migrate_destination`].
pub fn run_destination(
    mem: &GuestMemory,
    guest: &mut dyn GuestControl,
    session: &DestinationSession,
    data: &TcpListener,
    cfg: &MigrationConfig,
    hooks: &Hooks,
) -> Result<DestReport, MigrateError> {
    agree(session, cfg)?;
    let keys = SessionKeys::from_grant(session.key_grant());
    let conns = accept_proven(data, &keys, cfg.streams, cfg.io_timeout, &|| session.peer_closed())?;
    migrate_destination(mem, guest, conns, &keys, cfg, hooks, Some(session.commit_gate()))
}
