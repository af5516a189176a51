//! openraft's storage conformance suite against the SQLite log store and
//! the snapshotting state machine, each build in a fresh directory.

use openraft::testing::{StoreBuilder, Suite};

use crate::log_store::SqliteLogStore;
use crate::raft_types::{RegistryStorageError, RegistryTypeConfig};
use crate::state_machine::RegistryStateMachine;

struct FreshDirectory;

impl StoreBuilder<RegistryTypeConfig, SqliteLogStore, RegistryStateMachine, tempfile::TempDir> for FreshDirectory {
    async fn build(&self) -> Result<(tempfile::TempDir, SqliteLogStore, RegistryStateMachine), RegistryStorageError> {
        let directory = tempfile::tempdir().expect("temporary directory");
        let log_store = SqliteLogStore::open(&directory.path().join("raft.db")).expect("open the log store");
        let state_machine =
            RegistryStateMachine::open(directory.path().join("snapshots")).await.expect("open the state machine");
        Ok((directory, log_store, state_machine))
    }
}

/// The suite runs its own Tokio runtimes, so this is a plain test.
#[test]
fn the_stores_pass_openraft_storage_suite() {
    Suite::test_all(FreshDirectory).expect("openraft's storage suite passes");
}
