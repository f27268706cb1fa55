"""The kernel's FUSE ABI (``include/uapi/linux/fuse.h``, protocol 7.40+; this kernel is 6.18).

Layouts are written from the uapi header as ``struct`` formats, native byte order, no padding
beyond what the header spells out. We speak minor 7.41: 7.40 added ``FUSE_NOTIFY_RESEND``,
``backing_id`` in ``fuse_open_out`` and passthrough; later minors only add fields we do not
use, and the kernel accepts a lower minor from the daemon.
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 41
ROOT_ID = 1


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


# Opcodes that would change the tree: a read-only view answers them EROFS itself.
WRITE_OPS = frozenset({
    Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK,
    Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE, Op.RENAME2,
    Op.COPY_FILE_RANGE, Op.COPY_FILE_RANGE_64, Op.TMPFILE, Op.SETLK, Op.SETLKW,
})


class Init(enum.IntFlag):
    """INIT flags; bits 32+ travel in ``flags2`` and need ``INIT_EXT`` in the reply."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class Fopen(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


# fs/fuse/fuse_i.h: the only open flags the kernel accepts together with FOPEN_PASSTHROUGH.
FOPEN_PASSTHROUGH_MASK = (
    Fopen.PASSTHROUGH | Fopen.DIRECT_IO | Fopen.PARALLEL_DIRECT_WRITES | Fopen.NOFLUSH
)


class Notify(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8


GETATTR_FH = 1 << 0
READ_LOCKOWNER = 1 << 1
RELEASE_FLUSH = 1 << 0

# ioctls on /dev/fuse: _IOR/_IOW(FUSE_DEV_IOC_MAGIC=229, nr, type)
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (229 << 8) | nr


BACKING_MAP = struct.Struct("=iIQ")  # fuse_backing_map: s32 fd, u32 flags, u64 padding
FUSE_DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)
FUSE_DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, BACKING_MAP.size)
FUSE_DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)

# --- struct layouts --------------------------------------------------------------------------
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev
# blksize flags
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid + nsecs
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("=QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("=QIIQ")
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")  # count dummy
FORGET_ONE = struct.Struct("=QQ")  # nodeid nlookup
ACCESS_IN = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
# major minor max_readahead flags flags2 (7.36+); the kernel sends 64 bytes, older 16
INIT_IN = struct.Struct("=IIIII")
INIT_IN_OLD = struct.Struct("=IIII")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH22x")
KSTATFS = struct.Struct("=QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT_HEAD = struct.Struct("=QQII")  # ino off namelen type
# notify_unique nodeid offset size padding
NOTIFY_RETRIEVE_OUT = struct.Struct("=QQQII")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent namelen flags, then the name and a NUL
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert INIT_OUT.size == 64 and KSTATFS.size == 80 and READ_IN.size == 40


def dirent_size(namelen: int, plus: bool) -> int:
    """Size of one ``fuse_dirent`` (or ``fuse_direntplus``) padded to 8 bytes."""
    base = DIRENT_HEAD.size + namelen
    if plus:
        base += ENTRY_OUT_HEAD.size + ATTR.size
    return (base + 7) & ~7
