//! Accounts: who may log in, and with which password (kept in plaintext or
//! as a hash).
//!
//! The driver builds the table (the binary reads it from its credentials
//! file) and may change it while the server runs: [`AccountChange`]s, as
//! [`Accounts::changes_to`] finds them between the running table and a
//! reloaded one, go in through
//! [`Server::handle_account_change`](crate::Server::handle_account_change).
//! Each account gets a small integer `UserId`, so that the hot paths
//! (routing, blocking, presence) compare and index by integer instead of
//! hashing names. A removed account keeps its slot, empty, and its number
//! is never given again: whatever still names it (a login being checked, a
//! claim in flight) finds it gone instead of finding someone else.

use std::collections::HashMap;

use crate::password::{HashedPassword, Password};
use crate::username::Username;

/// The accounts a server knows.
///
/// ```
/// use chatproto::Accounts;
///
/// let mut accounts = Accounts::new();
/// accounts.insert("alice".parse().unwrap(), "wonderland".parse().unwrap()).unwrap();
/// assert!(accounts.insert("alice".parse().unwrap(), "again".parse().unwrap()).is_err());
/// assert_eq!(accounts.len(), 1);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    /// Every account ever held, removed ones included (by [`UserId`]).
    entries: Vec<Account>,
    /// The accounts held now.
    by_name: HashMap<Username, UserId>,
    /// A hash to check logins for unknown names against, so that they cost
    /// what a wrong password costs (the first hashed account's).
    decoy: Option<HashedPassword>,
}

/// One account.
#[derive(Clone, Debug)]
pub struct Account {
    name: Username,
    credential: Credential,
    removed: bool,
}

/// How an account's password is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// In plaintext: checked in constant time by the core.
    Plain(Password),
    /// As a hash: checked by the driver, off its event loop.
    Hashed(HashedPassword),
}

/// An account's index in its [`Accounts`] table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct UserId(u32);

/// The same user name was given twice.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("duplicate account {0}")]
pub struct DuplicateAccount(pub Username);

/// A change to the accounts of a running server: see
/// [`Server::handle_account_change`](crate::Server::handle_account_change).
///
/// ```
/// use chatproto::{AccountChange, Accounts};
///
/// let mut running = Accounts::new();
/// running.insert("alice".parse().unwrap(), "wonderland".parse().unwrap()).unwrap();
/// running.insert("bob".parse().unwrap(), "builder".parse().unwrap()).unwrap();
/// let mut reloaded = Accounts::new();
/// reloaded.insert("alice".parse().unwrap(), "looking-glass".parse().unwrap()).unwrap();
/// reloaded.insert("carol".parse().unwrap(), "singer".parse().unwrap()).unwrap();
/// let names: Vec<String> = running
///     .changes_to(&reloaded)
///     .iter()
///     .map(|change| format!("{} {}", change.kind(), change.name()))
///     .collect();
/// assert_eq!(names, ["removed bob", "credential_changed alice", "added carol"]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccountChange {
    /// A new account: it may log in at once.
    Added {
        /// Its name.
        name: Username,
        /// Its password.
        credential: Credential,
    },
    /// An account's password changed: it applies from the next login
    /// (a session open already stays open).
    CredentialChanged {
        /// Whose.
        name: Username,
        /// The new password.
        credential: Credential,
    },
    /// An account is gone: its session ends (`bye` reason
    /// `account_removed`), and its offline queue, its blocks (both ways),
    /// its last-seen time and its failed-login record are deleted.
    Removed {
        /// Whose.
        name: Username,
    },
}

/// An [`AccountChange`] that does not fit the accounts held.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccountChangeError {
    /// An account of that name exists already.
    #[error("account {0} exists already")]
    Exists(Username),
    /// No account of that name exists.
    #[error("no account {0}")]
    Unknown(Username),
}

impl AccountChange {
    /// The account it is about.
    pub fn name(&self) -> &Username {
        match self {
            AccountChange::Added { name, .. }
            | AccountChange::CredentialChanged { name, .. }
            | AccountChange::Removed { name } => name,
        }
    }

    /// `added`, `credential_changed` or `removed`: for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AccountChange::Added { .. } => "added",
            AccountChange::CredentialChanged { .. } => "credential_changed",
            AccountChange::Removed { .. } => "removed",
        }
    }
}

impl Accounts {
    /// An empty table.
    pub fn new() -> Self {
        Accounts::default()
    }

    /// Adds an account with a plaintext password; a name may appear once.
    pub fn insert(&mut self, name: Username, password: Password) -> Result<(), DuplicateAccount> {
        self.insert_credential(name, Credential::Plain(password))
    }

    /// Adds an account with a password hash; a name may appear once.
    pub fn insert_hashed(
        &mut self,
        name: Username,
        hash: HashedPassword,
    ) -> Result<(), DuplicateAccount> {
        self.insert_credential(name, Credential::Hashed(hash))
    }

    /// Adds an account; a name may appear once.
    pub fn insert_credential(
        &mut self,
        name: Username,
        credential: Credential,
    ) -> Result<(), DuplicateAccount> {
        self.add(name, credential).map(|_| ())
    }

    /// The changes that turn these accounts into `new`: removals first,
    /// then new passwords, then additions, each in `new`'s (or, for
    /// removals, this table's) order.
    pub fn changes_to(&self, new: &Accounts) -> Vec<AccountChange> {
        let removed = self
            .iter()
            .filter(|a| !new.contains(a.name.as_str()))
            .map(|a| AccountChange::Removed {
                name: a.name.clone(),
            });
        let mut changed = Vec::new();
        let mut added = Vec::new();
        for account in new.iter() {
            match self.id(account.name.as_str()).map(|id| self.get(id)) {
                Some(old) if old.credential == account.credential => {}
                Some(_) => changed.push(AccountChange::CredentialChanged {
                    name: account.name.clone(),
                    credential: account.credential.clone(),
                }),
                None => added.push(AccountChange::Added {
                    name: account.name.clone(),
                    credential: account.credential.clone(),
                }),
            }
        }
        removed.chain(changed).chain(added).collect()
    }

    /// Applies `change`; the account it touches.
    pub(crate) fn apply(&mut self, change: AccountChange) -> Result<UserId, AccountChangeError> {
        match change {
            AccountChange::Added { name, credential } => self
                .add(name, credential)
                .map_err(|DuplicateAccount(name)| AccountChangeError::Exists(name)),
            AccountChange::CredentialChanged { name, credential } => {
                let id = self
                    .id(name.as_str())
                    .ok_or(AccountChangeError::Unknown(name))?;
                self.note_decoy(&credential);
                self.entries[id.index()].credential = credential;
                Ok(id)
            }
            AccountChange::Removed { name } => {
                let id = self
                    .by_name
                    .remove(name.as_str())
                    .ok_or(AccountChangeError::Unknown(name))?;
                self.entries[id.index()].removed = true;
                Ok(id)
            }
        }
    }

    /// How many accounts keep their password in plaintext.
    pub fn plaintext_count(&self) -> usize {
        self.iter()
            .filter(|a| matches!(a.credential, Credential::Plain(_)))
            .count()
    }

    pub(crate) fn decoy(&self) -> Option<&HashedPassword> {
        self.decoy.as_ref()
    }

    /// How many accounts there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether `name` has an account.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The accounts, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = &Account> {
        self.entries.iter().filter(|a| !a.removed)
    }

    /// The accounts held now.
    pub(crate) fn ids(&self) -> impl Iterator<Item = UserId> + '_ {
        (0..self.entries.len() as u32)
            .map(UserId)
            .filter(|&id| !self.entries[id.index()].removed)
    }

    /// Whether `id` is an account held now (not removed).
    pub(crate) fn is_held(&self, id: UserId) -> bool {
        !self.entries[id.index()].removed
    }

    /// Adds an account under a new number.
    fn add(&mut self, name: Username, credential: Credential) -> Result<UserId, DuplicateAccount> {
        if self.by_name.contains_key(&name) {
            return Err(DuplicateAccount(name));
        }
        self.note_decoy(&credential);
        let id = UserId(u32::try_from(self.entries.len()).expect("fewer than 2^32 accounts"));
        self.by_name.insert(name.clone(), id);
        self.entries.push(Account {
            name,
            credential,
            removed: false,
        });
        Ok(id)
    }

    /// The first hash seen becomes the decoy.
    fn note_decoy(&mut self, credential: &Credential) {
        if let (None, Credential::Hashed(hash)) = (&self.decoy, credential) {
            self.decoy = Some(hash.clone());
        }
    }

    /// How many slots per-user tables need: one per account ever held.
    fn slots(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn id(&self, name: &str) -> Option<UserId> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn get(&self, id: UserId) -> &Account {
        &self.entries[id.index()]
    }

    pub(crate) fn name(&self, id: UserId) -> &Username {
        &self.entries[id.index()].name
    }
}

impl Account {
    /// The user name.
    pub fn name(&self) -> &Username {
        &self.name
    }

    /// How the password is kept.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// Whether `password` is this account's plaintext password (always
    /// false for a hashed one, which only the driver can check).
    pub fn check_password(&self, password: &Password) -> bool {
        match &self.credential {
            Credential::Plain(p) => p.matches(password),
            Credential::Hashed(_) => false,
        }
    }
}

impl UserId {
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// A table with one slot per account, indexed by [`UserId`].
#[derive(Clone, Debug)]
pub(crate) struct PerUser<T>(Vec<T>);

impl<T: Default> PerUser<T> {
    pub(crate) fn new(accounts: &Accounts) -> Self {
        PerUser((0..accounts.slots()).map(|_| T::default()).collect())
    }

    /// Adds empty slots for the accounts added since.
    pub(crate) fn grow(&mut self, accounts: &Accounts) {
        self.0.resize_with(accounts.slots(), T::default);
    }
}

impl<T> std::ops::Index<UserId> for PerUser<T> {
    type Output = T;

    fn index(&self, id: UserId) -> &T {
        &self.0[id.index()]
    }
}

impl<T> std::ops::IndexMut<UserId> for PerUser<T> {
    fn index_mut(&mut self, id: UserId) -> &mut T {
        &mut self.0[id.index()]
    }
}
