//! The migration ledger's rules, written once for every backend: which of a
//! version's migrations are new, and a refusal for one that was changed
//! after it was applied. Backends keep the ledger (a host table no
//! component can reach) and apply what [`plan`] returns in one transaction
//! with its ledger rows.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::{Error, Migration};

/// A migration not yet in the ledger, with the checksum to record for it.
pub struct Pending {
    pub migration: Migration,
    pub checksum: String,
}

/// The migrations of `migrations` that `recorded` (name → checksum) does
/// not hold, in order; an error if one was applied with different SQL.
pub fn plan(
    recorded: &HashMap<String, String>,
    migrations: &[Migration],
) -> Result<Vec<Pending>, Error> {
    let mut pending = Vec::new();
    for m in migrations {
        let checksum = checksum(&m.sql);
        match recorded.get(&m.name) {
            Some(sum) if *sum == checksum => {}
            Some(_) => {
                return Err(Error::InvalidQuery(format!(
                    "migration `{}` was changed after it was applied; \
                     add a new migration instead",
                    m.name
                )))
            }
            None => pending.push(Pending {
                migration: m.clone(),
                checksum,
            }),
        }
    }
    Ok(pending)
}

/// A failed migration's error, naming it.
pub fn failed(migration: &Migration, message: &str) -> Error {
    Error::InvalidQuery(format!("migration `{}` failed: {message}", migration.name))
}

fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, sql: &str) -> Migration {
        Migration {
            name: name.into(),
            sql: sql.into(),
        }
    }

    #[test]
    fn applied_migrations_are_skipped_and_changed_ones_refused() {
        let first = m("0001", "CREATE TABLE a (x BIGINT)");
        let recorded = HashMap::from([("0001".to_string(), checksum(&first.sql))]);
        let pending = plan(
            &recorded,
            &[first.clone(), m("0002", "CREATE TABLE b (y TEXT)")],
        )
        .unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].migration.name, "0002");
        let err = plan(&recorded, &[m("0001", "CREATE TABLE a (x TEXT)")])
            .err()
            .unwrap();
        assert!(err.to_string().contains("`0001` was changed"), "{err}");
    }
}
