//! Our iceoryx2 service type: `ipc_threadsafe::Service` with every storage FILE based.
//!
//! iceoryx2's default IPC service keeps its dynamic storages, data segments and connections in
//! POSIX shared memory (`shm_open`: names directly in /dev/shm, a world-writable directory
//! shared by every user), and its per-prefix global management segment is created 0666. With
//! file-based storages every file of a run lives under the config's root path instead, which
//! the supervisor makes a private directory per run (0700, see `supervisor/resources.py`):
//! other users cannot list, open, plant or truncate anything of it. The root lies on tmpfs
//! (/dev/shm) by default, so a file-backed mapping costs what an `shm_open` one costs.
//!
//! The file-based dynamic storage is also the one whose opening is bounded everywhere: the
//! POSIX one retries forever on a zero-sized segment (a truncated file hung every later node
//! creation and dead-node cleanup), the file one gives up after `global.creation_timeout`.
//!
//! The associated types follow `iceoryx2-0.10.0/src/service/ipc_threadsafe.rs`; only the
//! storages differ (`posix_shared_memory` -> `file`).

use core::fmt::Debug;

use iceoryx2_bb_elementary_traits::testing::abandonable::Abandonable;
use iceoryx2_bb_elementary_traits::zero_copy_send::ZeroCopySend;
use iceoryx2_bb_lock_free::mpmc::counting_bit_set::RelocatableCountingBitSet;
use iceoryx2_cal::event::trigger::State;
use iceoryx2_cal::event::trigger::unix_datagram_socket::GenericUnixDatagramSocketTrigger;
use iceoryx2_cal::shm_allocator::bump_allocator::BumpAllocator;
use iceoryx2_cal::shm_allocator::pool_allocator::PoolAllocator;
use iceoryx2_cal::*;

/// Zero-copy IPC over files under the config's root path (thread-safe ports).
#[derive(Debug, Clone)]
pub struct PrivateService {}

type FileStorage<T> = dynamic_storage::file::Storage<T>;
type FileMemory<A> = shared_memory::file::Memory<A>;

impl iceoryx2::service::Service for PrivateService {
    type StaticStorage = static_storage::recommended::Ipc;
    type ConfigSerializer = serialize::recommended::Recommended;
    type PersistentDynamicStorage<T: Debug + Send + Sync + ZeroCopySend + 'static> = FileStorage<T>;
    type Bag = bag::recommended::Recommended;
    type DynamicStorage<T: Debug + Send + Sync + ZeroCopySend + 'static> = FileStorage<T>;
    type ServiceNameHasher = hash::recommended::Recommended;
    type SharedMemory = FileMemory<PoolAllocator>;
    type ResizableSharedMemory =
        resizable_shared_memory::dynamic::DynamicMemory<PoolAllocator, FileMemory<PoolAllocator>>;
    type Connection = zero_copy_connection::file::Connection;
    type Event = GenericUnixDatagramSocketTrigger<
        RelocatableCountingBitSet,
        FileStorage<State<RelocatableCountingBitSet, ()>>,
    >;
    type Monitoring = monitoring::recommended::Ipc;
    type Reactor = reactor::recommended::Ipc;
    type ArcThreadSafetyPolicy<T: Send + Debug + Abandonable> =
        arc_sync_policy::mutex_protected::MutexProtected<T>;
    type BlackboardMgmt<KeyType: Send + Sync + Debug + ZeroCopySend + 'static> = FileStorage<KeyType>;
    type BlackboardPayload = FileMemory<BumpAllocator>;
    type UniqueId = iceoryx2::unique_id_generator::unique_system_id::UniqueSystemId;
}

impl iceoryx2::service::internal::ServiceInternal<PrivateService> for PrivateService {}
