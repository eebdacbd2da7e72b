/*
 * The appliance launcher: the first bytes of the single-file appliance.
 *
 * Why it exists: PyInstaller's one-file mode unpacks hundreds of MB into a fresh temp folder on every start (slow),
 * fails where /tmp is mounted noexec, and leaves temp folders behind after a crash. We build PyInstaller in onedir
 * mode instead and append that folder to this stub. The stub unpacks it ONCE into a per-user cache folder named by
 * the build id; every later start only checks a marker and execs the unpacked program (a few syscalls, no hashing).
 *
 * File layout (written by packaging/payload.py; all integers little-endian):
 *
 *   [this launcher][payload][program path][trailer]
 *
 *   payload      entry_count entries, back to back, each:
 *     header     36 bytes: u32 path_len, u32 mode (permission bits), u8 kind (0 file, 1 dir, 2 symlink),
 *                u8 method (0 stored, 1 raw deflate, no zlib wrapper), u16 reserved (0), u64 data_size (bytes that
 *                follow the path), u64 size (unpacked bytes), u32 crc32 of the unpacked bytes,
 *                u32 crc32 of the header's first 32 bytes followed by the path
 *     path       path_len bytes, UTF-8, relative, '/'-separated; no empty, "." or ".." parts
 *     data       data_size bytes; a symlink's data is its target (stored), which must stay inside the tree
 *   program      program_len bytes: the executable to exec, relative to the unpacked folder
 *   trailer      92 bytes: char build_id[32] (hex of the first 16 bytes of sha256(payload)), u64 payload_offset,
 *                u64 payload_size, u64 entry_count, u64 unpacked_size, u32 program_len,
 *                u32 crc32 of the preceding 68 trailer bytes followed by the program path,
 *                char magic[20] = "APPLIANCE-PAYLOAD\0v1" (last, so a truncated file has none)
 *
 * Unpack root: the first usable of $APPLIANCE_UNPACK_DIR, the user cache (survives reboots, private), and
 * ${TMPDIR:-/tmp}/appliance-<uid>/unpacked. Usable = created 0700, a folder owned by us and not group/world
 * writable, not on a noexec mount. Inside it: <build_id>/ (complete when .complete exists; .complete's mtime is the
 * last start; a running program holds a shared flock on .inuse), .lock (serialises unpacking and clean-up),
 * <build_id>.partial-<pid> (being unpacked) and <build_id>.trash-<pid> (being removed). Clean-up runs only when
 * unpacking, under .lock: it removes leftovers of dead processes, and other builds that are neither in use nor among
 * the 2 most recently started ones.
 *
 * The program is exec'd in place (same pid, argv[0] and arguments as typed, the user's umask) with
 * APPLIANCE_EXECUTABLE (this file) and APPLIANCE_UNPACKED (its folder) set, and glibc asked for huge pages
 * (GLIBC_TUNABLES, see ask_for_huge_pages). APPLIANCE_LAUNCHER_VERBOSE=1 tells on
 * stderr what was chosen and done; otherwise only errors are printed, as one line, with exit status 1 (126/127 when
 * the unpacked program itself cannot be exec'd, as a shell would). APPLIANCE_LAUNCHER_THREADS overrides the number
 * of unpacking threads (default: online CPUs, at most 4), for measuring.
 *
 * No fsync: crash safety comes from writing .complete last and renaming the folder into place; a killed unpack
 * leaves only a .partial folder, removed by the next one. (A power cut within the kernel's writeback delay after
 * the first start could still leave a marked folder with unwritten files; syncing 300+ MB would cost the seconds
 * this launcher exists to save.)
 *
 * Portable C11 + POSIX. The OS-specific parts are own_path, open_self, dir_is_noexec, user_cache_dir, the lock_*
 * helpers and start_program.
 */

#if defined(_WIN32)
/* A Windows launcher would find itself with GetModuleFileNameW, run the program with CreateProcessW and wait for it
 * (Windows has no exec that keeps the process), pass its exit code on, and serialise unpacking with LockFileEx. */
#error "the Windows launcher is not written yet"
#endif

#if defined(__linux__)
#define _GNU_SOURCE /* flock, ST_NOEXEC */
#elif defined(__APPLE__)
#define _DARWIN_C_SOURCE
#endif

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#if defined(__APPLE__)
#include <mach-o/dyld.h>
#include <sys/mount.h>
#define st_mtim st_mtimespec
#endif

#define MAGIC "APPLIANCE-PAYLOAD\0v1"
#define MAGIC_LEN 20
#define TRAILER_LEN 92
#define HEADER_LEN 36
#define ID_LEN 32
#define KEEP_OTHER_BUILDS 2
#define CHUNK (1u << 20)
#define MAX_THREADS 4

enum { KIND_FILE = 0, KIND_DIR = 1, KIND_SYMLINK = 2 };
enum { METHOD_STORED = 0, METHOD_DEFLATE = 1 };

typedef struct {
    char build_id[ID_LEN + 1];
    uint64_t payload_offset, payload_size, entry_count, unpacked_size;
    char program[PATH_MAX];
} Trailer;

typedef struct {
    char *name;
    uint32_t mode, crc;
    uint8_t kind, method;
    uint64_t data_size, size;
    const unsigned char *data;
} Entry;

/* ---- messages ------------------------------------------------------------------------------------------------ */

static bool g_verbose;
static mode_t g_umask; /* the user's, given back to the program; ours is 077 so nothing we create is shared */
static char g_partial[PATH_MAX]; /* removed by fail() so a failed unpack leaves nothing half-done behind */

static void remove_tree(int parent_fd, const char *name);

static void say(const char *fmt, ...) {
    if (!g_verbose) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("appliance-launcher: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static _Noreturn void fail_with(const char *prefix, const char *fmt, va_list ap) {
    if (g_partial[0]) remove_tree(AT_FDCWD, g_partial);
    fputs(prefix, stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    exit(1);
}

static _Noreturn void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_with("appliance: ", fmt, ap);
}

static _Noreturn void fail_damaged(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_with("appliance: this file is damaged or incomplete (download it again): ", fmt, ap);
}

#if defined(__GNUC__)
#define PRINTF_LIKE(fmt, first) __attribute__((format(printf, fmt, first)))
#else
#define PRINTF_LIKE(fmt, first)
#endif

/* snprintf for paths: a path that does not fit is refused, never silently cut (a cut path names another file). */
static bool PRINTF_LIKE(3, 4) path_fmt(char *out, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < cap;
}

static double ms_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* ---- the OS-specific parts ----------------------------------------------------------------------------------- */

/* The absolute path of this file, for APPLIANCE_EXECUTABLE. */
static void own_path(char *out, size_t cap) {
#if defined(__APPLE__)
    char raw[PATH_MAX];
    uint32_t size = sizeof raw;
    if (_NSGetExecutablePath(raw, &size) != 0 || !realpath(raw, out)) fail("cannot find my own file");
    (void)cap;
#else
    ssize_t n = readlink("/proc/self/exe", out, cap - 1);
    if (n <= 0) fail("cannot find my own file (/proc/self/exe: %s)", strerror(errno));
    out[n] = '\0';
#endif
}

/* The file to read the payload from; /proc/self/exe on Linux still works if the file was renamed meanwhile. */
static int open_self(const char *path) {
#if defined(__linux__)
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) return fd;
#endif
    int fd2 = open(path, O_RDONLY | O_CLOEXEC);
    if (fd2 < 0) fail("cannot read my own file %s: %s", path, strerror(errno));
    return fd2;
}

/* Whether programs may not be run from dir: the reason a noexec /tmp or cache must be skipped. */
static bool dir_is_noexec(const char *dir) {
#if defined(__APPLE__)
    struct statfs s;
    return statfs(dir, &s) == 0 && (s.f_flags & MNT_NOEXEC);
#else
    struct statvfs s;
    return statvfs(dir, &s) == 0 && (s.f_flag & ST_NOEXEC);
#endif
}

/* The per-user cache folder (without our suffix): it survives reboots, so the second start stays fast. */
static bool user_cache_dir(char *out, size_t cap, char *why, size_t why_cap) {
    bool fits = true;
    const char *home = getenv("HOME");
    if (!home || home[0] != '/') {
        struct passwd *pw = getpwuid(getuid());
        home = pw && pw->pw_dir && pw->pw_dir[0] == '/' ? pw->pw_dir : NULL;
    }
#if defined(__APPLE__)
    if (!home) return snprintf(why, why_cap, "no home folder (HOME unset, no passwd entry)"), false;
    fits = path_fmt(out, cap, "%s/Library/Caches", home);
#else
    const char *xdg = getenv("XDG_CACHE_HOME");
    if (!home && !(xdg && xdg[0] == '/'))
        return snprintf(why, why_cap, "no home folder (HOME unset, no passwd entry)"), false;
    fits = xdg && xdg[0] == '/' ? path_fmt(out, cap, "%s", xdg) : path_fmt(out, cap, "%s/.cache", home);
#endif
    if (!fits) snprintf(why, why_cap, "the cache folder's path is too long");
    return fits;
}

static void lock_exclusive(int fd) {
    while (flock(fd, LOCK_EX) != 0 && errno == EINTR) {}
}

static bool lock_shared(int fd) {
    int rc;
    while ((rc = flock(fd, LOCK_SH)) != 0 && errno == EINTR) {}
    return rc == 0;
}

/* False when another process holds any lock on fd: that build is in use. */
static bool try_lock_exclusive(int fd) { return flock(fd, LOCK_EX | LOCK_NB) == 0; }

/* Replace this process by the program: same pid, so signals, exit status and the terminal behave as if the
 * program had been started directly. */
static _Noreturn void start_program(const char *program, char **argv) {
    char *fallback[] = {(char *)program, NULL};
    execv(program, argv[0] ? argv : fallback);
    int err = errno;
    fprintf(stderr, "appliance: cannot start %s: %s\n", program, strerror(err));
    exit(err == ENOENT ? 127 : 126);
}

/* ---- the trailer --------------------------------------------------------------------------------------------- */

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static void read_exact(int fd, void *buf, size_t len, uint64_t off) {
    ssize_t n = pread(fd, buf, len, (off_t)off);
    if (n != (ssize_t)len) fail_damaged("cannot read %zu bytes at offset %llu", len, (unsigned long long)off);
}

/* A relative path that cannot leave the folder: no leading '/', no empty, "." or ".." parts, no NUL. */
static bool path_ok(const char *p, size_t n) {
    if (n == 0 || n >= PATH_MAX || p[0] == '/' || memchr(p, '\0', n)) return false;
    for (size_t start = 0; start <= n;) {
        const char *slash = memchr(p + start, '/', n - start);
        size_t end = slash ? (size_t)(slash - p) : n, len = end - start;
        if (len == 0 || (len == 1 && p[start] == '.') || (len == 2 && p[start] == '.' && p[start + 1] == '.'))
            return false;
        start = end + 1;
    }
    return true;
}

static void read_trailer(int fd, Trailer *t) {
    struct stat st;
    if (fstat(fd, &st) != 0) fail("cannot read my own file: %s", strerror(errno));
    uint64_t file_size = (uint64_t)st.st_size;
    unsigned char tr[TRAILER_LEN];
    if (file_size < TRAILER_LEN) fail_damaged("it is only %llu bytes long", (unsigned long long)file_size);
    read_exact(fd, tr, TRAILER_LEN, file_size - TRAILER_LEN);
    if (memcmp(tr + TRAILER_LEN - MAGIC_LEN, MAGIC, MAGIC_LEN) != 0)
        fail_damaged("no payload at its end (cut short?)");
    memcpy(t->build_id, tr, ID_LEN);
    t->build_id[ID_LEN] = '\0';
    t->payload_offset = le64(tr + 32);
    t->payload_size = le64(tr + 40);
    t->entry_count = le64(tr + 48);
    t->unpacked_size = le64(tr + 56);
    uint32_t program_len = le32(tr + 64), want_crc = le32(tr + 68);
    if (program_len == 0 || program_len >= PATH_MAX) fail_damaged("bad program path length %u", program_len);
    if (t->entry_count == 0 || t->payload_size == 0) fail_damaged("its payload is empty");
    if (t->payload_offset > file_size || t->payload_size > file_size ||
        t->payload_offset + t->payload_size + program_len + TRAILER_LEN != file_size)
        fail_damaged("its size (%llu bytes) does not match its trailer", (unsigned long long)file_size);
    read_exact(fd, t->program, program_len, file_size - TRAILER_LEN - program_len);
    t->program[program_len] = '\0';
    uLong crc = crc32(crc32(0L, Z_NULL, 0), tr, 68);
    if (crc32(crc, (const Bytef *)t->program, program_len) != want_crc) fail_damaged("its trailer is corrupt");
    if (strspn(t->build_id, "0123456789abcdef") != ID_LEN) fail_damaged("bad build id");
    if (!path_ok(t->program, program_len)) fail_damaged("bad program path");
}

/* ---- choosing where to unpack -------------------------------------------------------------------------------- */

static bool make_absolute(char *path, size_t cap) {
    if (path[0] == '/') return true;
    char cwd[PATH_MAX], rel[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return false;
    snprintf(rel, sizeof rel, "%s", path);
    return path_fmt(path, cap, "%s/%s", cwd, rel);
}

/* Ours alone: a folder owned by us that nobody else can write into (else they could swap our files). */
static bool private_dir(const char *path, char *why, size_t why_cap) {
    struct stat st;
    if (stat(path, &st) != 0) return snprintf(why, why_cap, "%s: %s", path, strerror(errno)), false;
    if (!S_ISDIR(st.st_mode)) return snprintf(why, why_cap, "%s is not a folder", path), false;
    if (st.st_uid != geteuid()) return snprintf(why, why_cap, "%s is owned by another user", path), false;
    if (st.st_mode & 022) return snprintf(why, why_cap, "%s is writable by others", path), false;
    return true;
}

/* mkdir -p with mode 0700 for the parts we create; a no-op (one stat) when the folder is already there. */
static bool make_dirs(const char *path, char *why, size_t why_cap) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return true;
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        char c = *p;
        *p = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST)
            return snprintf(why, why_cap, "cannot create %s: %s", buf, strerror(errno)), false;
        if (c == '\0') return true;
        *p = c;
    }
}

/* check_parent: our own appliance / appliance-<uid> level must be private too, or another user could rename. */
static bool root_usable(const char *root, bool check_parent, char *why, size_t why_cap) {
    if (!make_dirs(root, why, why_cap) || !private_dir(root, why, why_cap)) return false;
    if (check_parent) {
        char parent[PATH_MAX];
        snprintf(parent, sizeof parent, "%s", root);
        char *slash = strrchr(parent, '/');
        if (slash && slash != parent) *slash = '\0';
        if (!private_dir(parent, why, why_cap)) return false;
    }
    if (dir_is_noexec(root)) return snprintf(why, why_cap, "%s is on a noexec mount", root), false;
    return true;
}

static void choose_root(char *root, size_t cap) {
    char tried[4 * PATH_MAX + 256] = "", why[PATH_MAX + 128], base[PATH_MAX];
    size_t used = 0;
    for (int which = 0; which < 3; which++) {
        bool check_parent = which > 0, fits = true;
        why[0] = '\0';
        if (which == 0) {
            const char *env = getenv("APPLIANCE_UNPACK_DIR");
            if (!env || !env[0]) {
                say("APPLIANCE_UNPACK_DIR is not set");
                continue;
            }
            fits = path_fmt(root, cap, "%s", env);
        } else if (which == 1) {
            if (!user_cache_dir(base, sizeof base, why, sizeof why)) goto skip;
            fits = path_fmt(root, cap, "%s/appliance/unpacked", base);
        } else {
            const char *tmp = getenv("TMPDIR");
            fits = path_fmt(root, cap, "%s/appliance-%lu/unpacked", tmp && tmp[0] ? tmp : "/tmp",
                            (unsigned long)getuid());
        }
        if (!fits || !make_absolute(root, cap) || strlen(root) + ID_LEN + 64 > cap) {
            snprintf(why, sizeof why, "%.200s...: the path is too long", root);
            goto skip;
        }
        for (size_t n = strlen(root); n > 1 && root[n - 1] == '/'; n--) root[n - 1] = '\0';
        if (root_usable(root, check_parent, why, sizeof why)) {
            say("unpack root: %s", root);
            return;
        }
    skip:
        say("skipped %s", why);
        used += (size_t)snprintf(tried + used, sizeof tried - used, "%s%s", used ? "; " : "", why);
        if (used >= sizeof tried) used = sizeof tried - 1;
    }
    fail("no folder to unpack into (%s); set APPLIANCE_UNPACK_DIR to a folder of yours on a disk that allows "
         "running programs", tried);
}

/* ---- the hot path -------------------------------------------------------------------------------------------- */

/* Exec the unpacked program if build_dir is complete; returns only when it is not. No payload is read here. */
/* Ask glibc (2.35+; older ones ignore it) to back its large allocations with transparent huge pages where the
 * kernel gives them on request (THP "madvise", the usual default). llama.cpp zeroes its whole KV cache when it
 * creates a context: 720 MiB for the default plan, 0.50 s of page faults with 4 KiB pages, 0.16-0.22 s with huge
 * pages (measured on the 2-core machine), a third of a second start. A tunable the user set already is kept. */
static void ask_for_huge_pages(void) {
    const char *name = "glibc.malloc.hugetlb";
    const char *given = getenv("GLIBC_TUNABLES");
    if (given && strstr(given, name)) return;
    char value[4096];
    int n = given && *given ? snprintf(value, sizeof value, "%s:%s=1", given, name)
                            : snprintf(value, sizeof value, "%s=1", name);
    if (n > 0 && (size_t)n < sizeof value) setenv("GLIBC_TUNABLES", value, 1);
}

static void start_if_complete(const char *build_dir, const char *program, const char *self, char **argv,
                              const char *how) {
    char complete[PATH_MAX], inuse[PATH_MAX], path[PATH_MAX];
    if (!path_fmt(complete, sizeof complete, "%s/.complete", build_dir) ||
        !path_fmt(inuse, sizeof inuse, "%s/.inuse", build_dir) ||
        !path_fmt(path, sizeof path, "%s/%s", build_dir, program))
        fail("the path %s/%s is too long", build_dir, program);
    /* The check and the "last used" stamp in one call; a read-only unpack folder is still usable. */
    if (utimensat(AT_FDCWD, complete, NULL, 0) != 0 && (errno == ENOENT || access(complete, F_OK) != 0)) return;
    /* No O_CLOEXEC: the shared lock must live as long as the program, so clean-up never removes a running build. */
    int fd = open(inuse, O_RDONLY | O_NOFOLLOW);
    if (fd < 0) return;
    if (!lock_shared(fd) || access(complete, F_OK) != 0) { /* removed while we waited for the lock */
        close(fd);
        return;
    }
    if (setenv("APPLIANCE_EXECUTABLE", self, 1) != 0 || setenv("APPLIANCE_UNPACKED", build_dir, 1) != 0)
        fail("out of memory");
    ask_for_huge_pages();
    say("%s %s", how, build_dir);
    umask(g_umask);
    start_program(path, argv);
}

/* ---- clean-up ------------------------------------------------------------------------------------------------ */

static void remove_tree(int parent_fd, const char *name) {
    struct stat st;
    if (fstatat(parent_fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return;
    if (!S_ISDIR(st.st_mode)) {
        unlinkat(parent_fd, name, 0);
        return;
    }
    if ((st.st_mode & 0700) != 0700) fchmodat(parent_fd, name, 0700, 0);
    int fd = openat(parent_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    if (dir) {
        struct dirent *de;
        while ((de = readdir(dir)) != NULL)
            if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) remove_tree(fd, de->d_name);
        closedir(dir);
    } else if (fd >= 0) {
        close(fd);
    }
    unlinkat(parent_fd, name, AT_REMOVEDIR);
}

static bool is_build_id(const char *name, size_t len) {
    return len >= ID_LEN && strspn(name, "0123456789abcdef") >= ID_LEN;
}

/* <id>.partial-<pid> or <id>.trash-<pid> whose process is gone: a killed unpack or clean-up left it. */
static bool is_dead_leftover(const char *name) {
    if (!is_build_id(name, strlen(name))) return false;
    const char *rest = name + ID_LEN, *digits = NULL;
    if (strncmp(rest, ".partial-", 9) == 0) digits = rest + 9;
    else if (strncmp(rest, ".trash-", 7) == 0) digits = rest + 7;
    if (!digits || !digits[0] || strspn(digits, "0123456789") != strlen(digits)) return false;
    long pid = strtol(digits, NULL, 10);
    if (pid <= 0 || pid == (long)getpid()) return false;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

typedef struct {
    char name[ID_LEN + 1];
    struct timespec used;
} Build;

static int newest_first(const void *a, const void *b) {
    const struct timespec *x = &((const Build *)a)->used, *y = &((const Build *)b)->used;
    if (x->tv_sec != y->tv_sec) return x->tv_sec < y->tv_sec ? 1 : -1;
    return x->tv_nsec < y->tv_nsec ? 1 : x->tv_nsec > y->tv_nsec ? -1 : 0;
}

/* Remove a build nobody runs: take its .inuse lock exclusively, unmark it, move it aside, delete it. */
static bool remove_build_if_unused(int root_fd, const char *name) {
    char path[ID_LEN + 16], trash[ID_LEN + 32];
    snprintf(path, sizeof path, "%s/.inuse", name);
    int fd = openat(root_fd, path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0 && !try_lock_exclusive(fd)) {
        close(fd);
        return false;
    }
    snprintf(path, sizeof path, "%s/.complete", name);
    unlinkat(root_fd, path, 0);
    snprintf(trash, sizeof trash, "%s.trash-%ld", name, (long)getpid());
    bool moved = renameat(root_fd, name, root_fd, trash) == 0;
    if (fd >= 0) close(fd);
    remove_tree(root_fd, moved ? trash : name);
    return true;
}

/* Called with .lock held, so no other launcher is unpacking or cleaning at the same time. */
static void clean_up(const char *root, const char *keep_id) {
    int root_fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dir = root_fd >= 0 ? fdopendir(root_fd) : NULL;
    if (!dir) return;
    Build *builds = NULL;
    size_t n = 0, cap = 0, leftovers = 0, removed = 0, in_use = 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        size_t len = strlen(de->d_name);
        if (is_dead_leftover(de->d_name)) {
            remove_tree(root_fd, de->d_name);
            leftovers++;
        } else if (len == ID_LEN && is_build_id(de->d_name, len) && strcmp(de->d_name, keep_id) != 0) {
            if (n == cap) {
                Build *grown = realloc(builds, (cap = cap ? 2 * cap : 16) * sizeof *builds);
                if (!grown) break; /* prune what was listed so far */
                builds = grown;
            }
            memcpy(builds[n].name, de->d_name, ID_LEN + 1);
            char marker[ID_LEN + 16];
            struct stat st;
            snprintf(marker, sizeof marker, "%s/.complete", de->d_name);
            builds[n].used = fstatat(root_fd, marker, &st, 0) == 0 ? st.st_mtim : (struct timespec){0, 0};
            n++;
        }
    }
    if (n > 0) qsort(builds, n, sizeof *builds, newest_first);
    for (size_t i = KEEP_OTHER_BUILDS; i < n; i++) {
        if (remove_build_if_unused(root_fd, builds[i].name)) removed++;
        else in_use++;
    }
    closedir(dir);
    free(builds);
    say("clean-up: removed %zu leftover partial folders and %zu old builds; kept %zu recent and %zu in use", leftovers,
        removed, n < KEEP_OTHER_BUILDS ? n : (size_t)KEEP_OTHER_BUILDS, in_use);
}

/* ---- reading the index --------------------------------------------------------------------------------------- */

/* A symlink target, resolved lexically from the link's folder, must not climb out of the tree. */
static bool link_target_ok(const char *link, const char *target, size_t n) {
    if (n == 0 || target[0] == '/' || memchr(target, '\0', n)) return false;
    long depth = 0;
    for (const char *p = link; *p; p++) depth += *p == '/';
    for (size_t start = 0; start <= n;) {
        const char *slash = memchr(target + start, '/', n - start);
        size_t end = slash ? (size_t)(slash - target) : n, len = end - start;
        if (len == 2 && target[start] == '.' && target[start + 1] == '.') {
            if (--depth < 0) return false;
        } else if (len > 0 && !(len == 1 && target[start] == '.')) {
            depth++;
        }
        start = end + 1;
    }
    return true;
}

static Entry *read_index(const unsigned char *payload, const Trailer *t) {
    if (t->entry_count > t->payload_size / HEADER_LEN) fail_damaged("bad entry count");
    Entry *entries = calloc((size_t)t->entry_count + 1, sizeof *entries);
    if (!entries) fail("out of memory");
    const unsigned char *p = payload, *end = payload + t->payload_size;
    uint64_t total = 0;
    for (uint64_t i = 0; i < t->entry_count; i++) {
        Entry *e = &entries[i];
        if ((size_t)(end - p) < HEADER_LEN) fail_damaged("entry %llu is cut short", (unsigned long long)i);
        uint32_t path_len = le32(p);
        e->mode = le32(p + 4);
        e->kind = p[8];
        e->method = p[9];
        e->data_size = le64(p + 12);
        e->size = le64(p + 20);
        e->crc = le32(p + 28);
        if (path_len >= PATH_MAX || (size_t)(end - p) - HEADER_LEN < path_len)
            fail_damaged("entry %llu has a bad path length", (unsigned long long)i);
        uLong crc = crc32(crc32(0L, Z_NULL, 0), p, 32);
        if (crc32(crc, p + HEADER_LEN, path_len) != le32(p + 32))
            fail_damaged("entry %llu has a corrupt header", (unsigned long long)i);
        const char *path = (const char *)p + HEADER_LEN;
        if (!path_ok(path, path_len))
            fail_damaged("refusing entry path \"%.*s\" (it would leave the folder)", (int)path_len, path);
        if ((path_len == 9 && !memcmp(path, ".complete", 9)) || (path_len == 6 && !memcmp(path, ".inuse", 6)))
            fail_damaged("refusing entry path \"%.*s\" (the launcher's own marker)", (int)path_len, path);
        if (!(e->name = malloc(path_len + 1))) fail("out of memory");
        memcpy(e->name, path, path_len);
        e->name[path_len] = '\0';
        p += HEADER_LEN + path_len;
        if (e->data_size > (uint64_t)(end - p)) fail_damaged("%s is cut short", e->name);
        e->data = p;
        p += e->data_size;
        bool sizes_ok = e->method == METHOD_DEFLATE ? e->kind == KIND_FILE : e->data_size == e->size;
        if (e->kind > KIND_SYMLINK || e->method > METHOD_DEFLATE || !sizes_ok ||
            (e->kind == KIND_DIR && e->size != 0))
            fail_damaged("%s has a bad header", e->name);
        if (e->kind == KIND_SYMLINK && !link_target_ok(e->name, (const char *)e->data, (size_t)e->data_size))
            fail_damaged("refusing symlink %s (its target leaves the folder)", e->name);
        if (e->size > UINT64_MAX - total) fail_damaged("sizes overflow");
        total += e->size;
    }
    if (p != end) fail_damaged("%llu stray bytes after the last entry", (unsigned long long)(end - p));
    if (total != t->unpacked_size) fail_damaged("the entries' sizes do not add up");
    /* A symlink inside a symlinked folder could point anywhere once its parent resolves: refuse that shape. */
    for (uint64_t i = 0; i < t->entry_count; i++) {
        if (entries[i].kind != KIND_SYMLINK) continue;
        for (uint64_t j = 0; j < t->entry_count; j++) {
            size_t n = strlen(entries[j].name);
            if (entries[j].kind == KIND_SYMLINK && !strncmp(entries[i].name, entries[j].name, n) &&
                entries[i].name[n] == '/')
                fail_damaged("refusing symlink %s inside symlink %s", entries[i].name, entries[j].name);
        }
    }
    return entries;
}

/* ---- unpacking ----------------------------------------------------------------------------------------------- */

typedef struct {
    Entry **files; /* largest first, so two workers finish close together */
    size_t count;
    int dir_fd;
    atomic_size_t next;
    atomic_bool failed;
    pthread_mutex_t mu;
    bool damaged;
    char error[PATH_MAX + 256];
} Job;

static void job_fail(Job *job, bool damaged, const char *fmt, ...) {
    pthread_mutex_lock(&job->mu);
    if (!atomic_load(&job->failed)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(job->error, sizeof job->error, fmt, ap);
        va_end(ap);
        job->damaged = damaged;
        atomic_store(&job->failed, true);
    }
    pthread_mutex_unlock(&job->mu);
}

static bool write_all(int fd, const unsigned char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        buf += n;
        len -= (size_t)n;
    }
    return true;
}

/* Inflate or copy one entry into fd, checking its crc32; false with job->error set on failure. */
static bool fill_file(Job *job, const Entry *e, int fd, z_stream *zs, unsigned char *buf) {
    uLong crc = crc32(0L, Z_NULL, 0);
    if (e->method == METHOD_STORED) {
        for (uint64_t off = 0; off < e->size;) {
            size_t n = e->size - off < 8 * CHUNK ? (size_t)(e->size - off) : 8 * CHUNK;
            crc = crc32(crc, e->data + off, (uInt)n);
            if (!write_all(fd, e->data + off, n))
                return job_fail(job, false, "%s: %s", e->name, strerror(errno)), false;
            off += n;
        }
    } else {
        if (inflateReset(zs) != Z_OK) return job_fail(job, false, "zlib: inflateReset failed"), false;
        zs->next_in = (Bytef *)e->data;
        uint64_t in_left = e->data_size, out_total = 0;
        int rc = Z_OK;
        while (rc != Z_STREAM_END) {
            if (zs->avail_in == 0) {
                if (in_left == 0) return job_fail(job, true, "%s: its compressed data ends early", e->name), false;
                zs->avail_in = in_left > (1u << 30) ? (1u << 30) : (uInt)in_left;
                in_left -= zs->avail_in;
            }
            zs->next_out = buf;
            zs->avail_out = CHUNK;
            rc = inflate(zs, Z_NO_FLUSH);
            if (rc != Z_OK && rc != Z_STREAM_END)
                return job_fail(job, true, "%s: its compressed data is corrupt", e->name), false;
            size_t got = CHUNK - zs->avail_out;
            out_total += got;
            if (out_total > e->size) return job_fail(job, true, "%s: it unpacks too large", e->name), false;
            crc = crc32(crc, buf, (uInt)got);
            if (!write_all(fd, buf, got)) return job_fail(job, false, "%s: %s", e->name, strerror(errno)), false;
        }
        if (out_total != e->size || in_left != 0 || zs->avail_in != 0)
            return job_fail(job, true, "%s: its size does not match", e->name), false;
    }
    if (crc != e->crc) return job_fail(job, true, "%s: its checksum does not match", e->name), false;
    return true;
}

static void *unpack_worker(void *arg) {
    Job *job = arg;
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    unsigned char *buf = malloc(CHUNK);
    if (!buf || inflateInit2(&zs, -MAX_WBITS) != Z_OK) {
        job_fail(job, false, "out of memory");
        free(buf);
        return NULL;
    }
    size_t i;
    while (!atomic_load(&job->failed) && (i = atomic_fetch_add(&job->next, 1)) < job->count) {
        const Entry *e = job->files[i];
        int fd = openat(job->dir_fd, e->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) {
            bool damaged = errno == ENOENT || errno == EEXIST || errno == ENOTDIR;
            job_fail(job, damaged, "%s: %s", e->name, strerror(errno));
            break;
        }
        bool ok = fill_file(job, e, fd, &zs, buf) && fchmod(fd, (mode_t)(e->mode & 0777)) == 0;
        if (close(fd) != 0) ok = false; /* a network file system may report a full disk only here */
        if (!ok) {
            job_fail(job, false, "%s: %s", e->name, strerror(errno)); /* no-op when fill_file said why */
            break;
        }
    }
    inflateEnd(&zs);
    free(buf);
    return NULL;
}

static int larger_first(const void *a, const void *b) {
    uint64_t x = (*(Entry *const *)a)->size, y = (*(Entry *const *)b)->size;
    return x < y ? 1 : x > y ? -1 : 0;
}

static int thread_count(size_t files) {
    const char *env = getenv("APPLIANCE_LAUNCHER_THREADS"); /* for measuring; the default suits a 2-core box */
    long n = env && env[0] ? strtol(env, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if ((size_t)n > files) n = files ? (long)files : 1;
    return (int)n;
}

static _Noreturn void fail_write(const char *root, const Trailer *t, const char *what) {
    fail("cannot unpack into %s: %s (it needs %.0f MB of free space there; or set APPLIANCE_UNPACK_DIR)", root, what,
         (double)t->unpacked_size / 1e6);
}

/* A path the payload itself makes impossible (no parent, twice) is damage; anything else is the disk's fault. */
static _Noreturn void fail_creating(const char *root, const Trailer *t, const char *name) {
    if (errno == ENOENT || errno == EEXIST || errno == ENOTDIR) fail_damaged("%s: %s", name, strerror(errno));
    char what[PATH_MAX + 128];
    snprintf(what, sizeof what, "%s: %s", name, strerror(errno));
    fail_write(root, t, what);
}

/* Unpack every entry into g_partial (already created, empty), then mark it complete. */
static void unpack(const char *root, const unsigned char *payload, const Trailer *t) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    Entry *entries = read_index(payload, t);
    int dir_fd = open(g_partial, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd < 0) fail_write(root, t, strerror(errno));
    Job job = {.files = calloc((size_t)t->entry_count + 1, sizeof(Entry *)), .dir_fd = dir_fd};
    if (!job.files) fail("out of memory");
    pthread_mutex_init(&job.mu, NULL);
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, false);
    for (uint64_t i = 0; i < t->entry_count; i++) {
        Entry *e = &entries[i];
        if (e->kind == KIND_FILE) job.files[job.count++] = e;
        else if (e->kind == KIND_DIR && mkdirat(dir_fd, e->name, 0700) != 0)
            fail_creating(root, t, e->name);
    }
    qsort(job.files, job.count, sizeof *job.files, larger_first);
    int threads = thread_count(job.count);
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (; started < threads - 1; started++)
        if (pthread_create(&ids[started], NULL, unpack_worker, &job) != 0) break;
    unpack_worker(&job);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
    if (atomic_load(&job.failed)) {
        if (job.damaged) fail_damaged("%s", job.error);
        fail_write(root, t, job.error);
    }
    /* Symlinks last: while files are written no path in the tree can lead outside it. Folder modes last too, and
     * always owner-rwx, so a read-only folder never blocks writing into it or removing it later. */
    for (uint64_t i = 0; i < t->entry_count; i++) {
        Entry *e = &entries[i];
        if (e->kind != KIND_SYMLINK) continue;
        char target[PATH_MAX];
        memcpy(target, e->data, (size_t)e->size);
        target[e->size] = '\0';
        if (symlinkat(target, dir_fd, e->name) != 0) fail_creating(root, t, e->name);
    }
    for (uint64_t i = 0; i < t->entry_count; i++)
        if (entries[i].kind == KIND_DIR)
            fchmodat(dir_fd, entries[i].name, (mode_t)((entries[i].mode & 0777) | 0700), 0);
    int fd = openat(dir_fd, ".inuse", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || close(fd) != 0) fail_write(root, t, strerror(errno));
    fd = openat(dir_fd, ".complete", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    char line[ID_LEN + 2];
    snprintf(line, sizeof line, "%s\n", t->build_id);
    if (fd < 0 || !write_all(fd, (const unsigned char *)line, ID_LEN + 1) || close(fd) != 0)
        fail_write(root, t, strerror(errno));
    close(dir_fd);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_ms = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
                    (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
    say("unpacked %zu files, %.1f MB in %.0f ms (%d threads, %.0f ms CPU) into %s/%s", job.count,
        (double)t->unpacked_size / 1e6, ms_since(&t0), threads, cpu_ms, root, t->build_id);
}

/* ---- main ---------------------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    (void)argc;
    const char *verbose = getenv("APPLIANCE_LAUNCHER_VERBOSE");
    g_verbose = verbose && verbose[0] && strcmp(verbose, "0") != 0;
    g_umask = umask(077);
    char self[PATH_MAX], root[PATH_MAX], build_dir[PATH_MAX], lock_path[PATH_MAX];
    own_path(self, sizeof self);
    int self_fd = open_self(self);
    Trailer t;
    read_trailer(self_fd, &t);
    choose_root(root, sizeof root);
    /* choose_root left room for these (root + 64 bytes < PATH_MAX), so they cannot be cut */
    path_fmt(build_dir, sizeof build_dir, "%s/%s", root, t.build_id);
    start_if_complete(build_dir, t.program, self, argv, "reused");

    /* First start of this build: unpack it once, under a lock so concurrent first starts do not race. */
    path_fmt(lock_path, sizeof lock_path, "%s/.lock", root);
    int lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0) fail("cannot open %s: %s", lock_path, strerror(errno));
    lock_exclusive(lock_fd);
    start_if_complete(build_dir, t.program, self, argv, "reused (another start unpacked it meanwhile)");
    say("%s is not unpacked yet", build_dir);
    clean_up(root, t.build_id);
    remove_tree(AT_FDCWD, build_dir); /* an unmarked folder (say, restored from a backup) is not to be trusted */

    struct statvfs fs;
    if (statvfs(root, &fs) == 0 && (uint64_t)fs.f_bavail * fs.f_frsize < t.unpacked_size + (1u << 20))
        fail("not enough free space in %s: it needs %.0f MB, %.0f MB are free; free some or set "
             "APPLIANCE_UNPACK_DIR", root, (double)t.unpacked_size / 1e6, (double)fs.f_bavail * (double)fs.f_frsize / 1e6);
    path_fmt(g_partial, sizeof g_partial, "%s.partial-%ld", build_dir, (long)getpid());
    if (mkdir(g_partial, 0700) != 0) {
        g_partial[0] = '\0';
        fail_write(root, &t, strerror(errno));
    }
    uint64_t start = t.payload_offset - t.payload_offset % (uint64_t)sysconf(_SC_PAGESIZE);
    size_t map_len = (size_t)(t.payload_offset - start + t.payload_size);
    void *map = mmap(NULL, map_len, PROT_READ, MAP_PRIVATE, self_fd, (off_t)start);
    if (map == MAP_FAILED) fail("cannot map my own file: %s", strerror(errno));
    posix_madvise(map, map_len, POSIX_MADV_WILLNEED); /* read ahead: the whole payload is about to be used */
    unpack(root, (const unsigned char *)map + (t.payload_offset - start), &t);
    if (rename(g_partial, build_dir) != 0) fail_write(root, &t, strerror(errno));
    g_partial[0] = '\0';
    munmap(map, map_len);
    close(self_fd);
    start_if_complete(build_dir, t.program, self, argv, "starting");
    fail("unpacked into %s but cannot start it", build_dir);
}
