//! Device statistics, the same way for every device: the device and its worker thread update
//! relaxed atomics ([`Counter`], [`Flag`]); anyone reads them as one plain snapshot, through the
//! device or through a reader handle that outlives handing the transport to the MMIO bus.
//!
//! [`device_stats!`] writes the three types a device needs from one list of fields: the public
//! snapshot (`NetStats`), the live counters behind it, and the reader (`NetStatsReader`).

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A statistics counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// A statistics flag: once set, set.
#[derive(Debug, Default)]
pub(crate) struct Flag(AtomicBool);

impl Flag {
    /// Sets the flag.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the flag is set.
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A field type of a statistics snapshot, and the atomic cell it is counted in.
pub(crate) trait Stat {
    type Cell: Default + Debug;
    fn load(cell: &Self::Cell) -> Self;
}

impl Stat for u64 {
    type Cell = Counter;
    fn load(cell: &Counter) -> u64 {
        cell.0.load(Ordering::Relaxed)
    }
}

impl Stat for bool {
    type Cell = Flag;
    fn load(cell: &Flag) -> bool {
        cell.get()
    }
}

/// Defines a device's statistics: the snapshot struct as written (every field `u64` or `bool`),
/// `$counters` (the same fields as [`Counter`]s and [`Flag`]s, with `snapshot()`), and
/// `$reader`, a cloneable handle on them whose `get()` returns a snapshot.
macro_rules! device_stats {
    (
        $(#[$meta:meta])*
        pub struct $stats:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: $ty:ty, )*
        }
        counters: $counters:ident,
        reader: $reader:ident $(,)?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $stats {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        #[doc = concat!("The live counters behind [`", stringify!($stats), "`].")]
        #[derive(Debug, Default)]
        pub(crate) struct $counters {
            $( pub(crate) $field: <$ty as $crate::devices::virtio::stats::Stat>::Cell, )*
        }

        impl $counters {
            /// The counters now.
            pub(crate) fn snapshot(&self) -> $stats {
                $stats {
                    $( $field: <$ty as $crate::devices::virtio::stats::Stat>::load(&self.$field), )*
                }
            }
        }

        #[doc = concat!(
            "A handle on a device's counters ([`", stringify!($stats), "`]) that outlives ",
            "handing the transport to the MMIO bus."
        )]
        #[derive(Debug, Clone)]
        pub struct $reader(std::sync::Arc<$counters>);

        impl $reader {
            pub(crate) fn new(counters: std::sync::Arc<$counters>) -> $reader {
                $reader(counters)
            }

            /// The counters now.
            pub fn get(&self) -> $stats {
                self.0.snapshot()
            }
        }
    };
}
pub(crate) use device_stats;
