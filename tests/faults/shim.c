/*
 * LD_PRELOAD fault-injection shim: make process-creation and wait calls fail
 * with a chosen errno, after N calls and/or every K calls.
 *
 * Build:  cc -O2 -shared -fPIC -o libffshim.so shim.c -ldl
 * Use:    LD_PRELOAD=./libffshim.so FF_SHIM_FUNCS=fork,waitpid FF_SHIM_ERRNO=EAGAIN \
 *         FF_SHIM_AFTER=3 FF_SHIM_EVERY=2 FF_SHIM_COUNT=5 python ...
 *
 * Knobs (read once, at load time):
 *   FF_SHIM_FUNCS    comma-separated names of wrapped functions, or "all".
 *   FF_SHIM_ERRNO    errno name (EAGAIN, ENOMEM, EINTR, EMFILE, ...) or number.
 *   FF_SHIM_AFTER    the first N calls of each function succeed (default 0).
 *   FF_SHIM_EVERY    then every K-th call fails (default 1: every call).
 *   FF_SHIM_COUNT    at most this many failures per function (default: no limit).
 *   FF_SHIM_INHERIT  "1": also inject in forked children (default: only in the
 *                    process that loaded the shim).
 *   FF_SHIM_ARMED    "0": start disarmed; arm later with ff_shim_arm(1).
 *   FF_SHIM_EXE      inject only into a process running this executable (its
 *                    resolved path); launchers in between stay untouched.
 *
 * The FF_SHIM_* variables are removed from the environment of the target at
 * load time (unless FF_SHIM_INHERIT=1), so programs it execs run with an inert
 * shim.
 *
 * Calls are counted per function. An injected failure does no work: it returns
 * -1 with errno set (posix_spawn*: returns the error number), exactly what the
 * real call returns when the kernel refuses. ctypes.CDLL(None) reaches the
 * control functions ff_shim_arm, ff_shim_configure, ff_shim_calls and
 * ff_shim_failures.
 *
 * Only calls through the dynamic symbol are seen (os.fork, a Cython module's
 * fork(), _posixsubprocess's vfork(), ...); glibc's internal calls (fork ->
 * _Fork, waitpid -> __wait4, posix_spawn -> __clone_internal) and raw
 * syscall()s are not.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

enum {
    F_FORK, F__FORK, F_VFORK, F_CLONE, F_POSIX_SPAWN, F_POSIX_SPAWNP,
    F_WAITPID, F_WAIT, F_WAIT3, F_WAIT4, F_WAITID,
    F_POLL, F_PPOLL, F_SELECT, F_PIPE, F_PIPE2,
    F_COUNT
};

static const char *const names[F_COUNT] = {
    "fork", "_Fork", "vfork", "clone", "posix_spawn", "posix_spawnp",
    "waitpid", "wait", "wait3", "wait4", "waitid",
    "poll", "ppoll", "select", "pipe", "pipe2",
};

static struct {
    int enabled[F_COUNT];
    int err;
    long after, every, count;
    int inherit;
    int armed;
    pid_t owner;
} cfg = { .every = 1, .count = -1, .armed = 1 };

static long calls[F_COUNT];
static long failures[F_COUNT];
static void *real[F_COUNT];

static const struct { const char *name; int value; } errnos[] = {
    {"EAGAIN", EAGAIN}, {"ENOMEM", ENOMEM}, {"EINTR", EINTR}, {"EMFILE", EMFILE},
    {"ENFILE", ENFILE}, {"EPERM", EPERM}, {"ECHILD", ECHILD}, {"ENOSYS", ENOSYS},
    {"EACCES", EACCES}, {"EINVAL", EINVAL}, {"ENOSPC", ENOSPC}, {"EBUSY", EBUSY},
};

static int parse_errno(const char *s)
{
    size_t i;
    for (i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
        if (strcmp(s, errnos[i].name) == 0)
            return errnos[i].value;
    return atoi(s);
}

static void set_funcs(const char *list)
{
    char buf[512];
    char *tok, *save = NULL;
    int i;
    memset(cfg.enabled, 0, sizeof(cfg.enabled));
    if (list == NULL)
        return;
    strncpy(buf, list, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = '\0';
    for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
        for (i = 0; i < F_COUNT; i++)
            if (strcmp(tok, "all") == 0 || strcmp(tok, names[i]) == 0)
                cfg.enabled[i] = 1;
}

static long env_long(const char *name, long dflt)
{
    const char *v = getenv(name);
    return (v && *v) ? atol(v) : dflt;
}

/* Reset the counters and set a new policy; the control entry point for ctypes. */
void ff_shim_configure(const char *funcs, int err, long after, long every, long count)
{
    set_funcs(funcs);
    cfg.err = err;
    cfg.after = after < 0 ? 0 : after;
    cfg.every = every < 1 ? 1 : every;
    cfg.count = count;
    memset(calls, 0, sizeof(calls));
    memset(failures, 0, sizeof(failures));
}

/* Arm (1) or disarm (0) injection; returns the previous state. */
int ff_shim_arm(int on)
{
    int was = __atomic_exchange_n(&cfg.armed, on, __ATOMIC_SEQ_CST);
    return was;
}

static int index_of(const char *name)
{
    int i;
    for (i = 0; i < F_COUNT; i++)
        if (name && strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

/* Calls of ``name`` seen since load or the last ff_shim_configure; -1 if unknown. */
long ff_shim_calls(const char *name)
{
    int i = index_of(name);
    return i < 0 ? -1 : __atomic_load_n(&calls[i], __ATOMIC_SEQ_CST);
}

/* Failures injected into ``name``; -1 if unknown. */
long ff_shim_failures(const char *name)
{
    int i = index_of(name);
    return i < 0 ? -1 : __atomic_load_n(&failures[i], __ATOMIC_SEQ_CST);
}

__attribute__((constructor)) static void shim_init(void)
{
    static const char *const knobs[] = {
        "FF_SHIM_FUNCS", "FF_SHIM_ERRNO", "FF_SHIM_AFTER", "FF_SHIM_EVERY",
        "FF_SHIM_COUNT", "FF_SHIM_INHERIT", "FF_SHIM_ARMED", "FF_SHIM_EXE",
    };
    const char *e = getenv("FF_SHIM_ERRNO"), *exe = getenv("FF_SHIM_EXE");
    char self[4096];
    ssize_t n;
    size_t i;
    if (exe && *exe) {
        n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        self[n > 0 ? n : 0] = '\0';
        if (strcmp(self, exe) != 0)
            return;  /* not the target: every function stays disabled */
    }
    ff_shim_configure(getenv("FF_SHIM_FUNCS"), e ? parse_errno(e) : EAGAIN,
                      env_long("FF_SHIM_AFTER", 0), env_long("FF_SHIM_EVERY", 1),
                      env_long("FF_SHIM_COUNT", -1));
    cfg.inherit = env_long("FF_SHIM_INHERIT", 0) == 1;
    cfg.armed = env_long("FF_SHIM_ARMED", 1) != 0;
    cfg.owner = getpid();
    if (!cfg.inherit)
        for (i = 0; i < sizeof(knobs) / sizeof(knobs[0]); i++)
            unsetenv(knobs[i]);
}

static void *lookup(int f)
{
    void *p = __atomic_load_n(&real[f], __ATOMIC_ACQUIRE);
    if (p == NULL) {
        p = dlsym(RTLD_NEXT, names[f]);
        __atomic_store_n(&real[f], p, __ATOMIC_RELEASE);
    }
    return p;
}

/* Count a call of f; return 1 (with errno set) if it must fail now. Async-signal-safe. */
static int inject(int f)
{
    long n, k;
    if (!cfg.enabled[f] || !__atomic_load_n(&cfg.armed, __ATOMIC_RELAXED))
        return 0;
    if (!cfg.inherit && getpid() != cfg.owner)
        return 0;
    n = __atomic_add_fetch(&calls[f], 1, __ATOMIC_SEQ_CST);
    if (n <= cfg.after || (n - cfg.after) % cfg.every != 0)
        return 0;
    /* Claim one failure slot; give it back if the budget is spent. */
    k = __atomic_add_fetch(&failures[f], 1, __ATOMIC_SEQ_CST);
    if (cfg.count >= 0 && k > cfg.count) {
        __atomic_sub_fetch(&failures[f], 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    errno = cfg.err;
    return 1;
}

/* The real function's missing (e.g. _Fork before glibc 2.34): behave as ENOSYS. */
#define REAL(f, sym) \
    __typeof__(&sym) fn = (__typeof__(&sym))lookup(f); \
    if (fn == NULL) { errno = ENOSYS; return -1; }

pid_t fork(void)
{
    if (inject(F_FORK))
        return -1;
    REAL(F_FORK, fork);
    return fn();
}

pid_t _Fork(void);  /* glibc 2.34+; declared here for older headers */

pid_t _Fork(void)
{
    if (inject(F__FORK))
        return -1;
    REAL(F__FORK, _Fork);
    return fn();
}

/*
 * A wrapper cannot call the real vfork(): the child would return through this
 * function's stack frame, which it shares with the suspended parent, and
 * corrupt it (vfork(2) NOTES). POSIX lets vfork be a fork, and a correct vfork
 * child only execs or _exits, so the successful path is a plain fork.
 */
pid_t vfork(void)
{
    if (inject(F_VFORK))
        return -1;
    REAL(F_FORK, fork);
    return fn();
}

int clone(int (*child)(void *), void *stack, int flags, void *arg, ...)
{
    va_list ap;
    pid_t *ptid;
    void *tls;
    pid_t *ctid;
    /* A new thread is not a new process: only process creation fails. */
    if (!(flags & CLONE_THREAD) && inject(F_CLONE))
        return -1;
    va_start(ap, arg);
    ptid = va_arg(ap, pid_t *);
    tls = va_arg(ap, void *);
    ctid = va_arg(ap, pid_t *);
    va_end(ap);
    REAL(F_CLONE, clone);
    return fn(child, stack, flags, arg, ptid, tls, ctid);
}

typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);

int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    spawn_fn fn;
    if (inject(F_POSIX_SPAWN))
        return errno;
    if ((fn = (spawn_fn)lookup(F_POSIX_SPAWN)) == NULL)
        return ENOSYS;
    return fn(pid, path, fa, attr, argv, envp);
}

int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    spawn_fn fn;
    if (inject(F_POSIX_SPAWNP))
        return errno;
    if ((fn = (spawn_fn)lookup(F_POSIX_SPAWNP)) == NULL)
        return ENOSYS;
    return fn(pid, file, fa, attr, argv, envp);
}

pid_t waitpid(pid_t pid, int *status, int options)
{
    if (inject(F_WAITPID))
        return -1;
    REAL(F_WAITPID, waitpid);
    return fn(pid, status, options);
}

pid_t wait(int *status)
{
    if (inject(F_WAIT))
        return -1;
    REAL(F_WAIT, wait);
    return fn(status);
}

pid_t wait3(int *status, int options, struct rusage *ru)
{
    if (inject(F_WAIT3))
        return -1;
    REAL(F_WAIT3, wait3);
    return fn(status, options, ru);
}

pid_t wait4(pid_t pid, int *status, int options, struct rusage *ru)
{
    if (inject(F_WAIT4))
        return -1;
    REAL(F_WAIT4, wait4);
    return fn(pid, status, options, ru);
}

int waitid(idtype_t idtype, id_t id, siginfo_t *info, int options)
{
    if (inject(F_WAITID))
        return -1;
    REAL(F_WAITID, waitid);
    return fn(idtype, id, info, options);
}

int poll(struct pollfd *fds, nfds_t nfds, int timeout)
{
    if (inject(F_POLL))
        return -1;
    REAL(F_POLL, poll);
    return fn(fds, nfds, timeout);
}

int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *ts, const sigset_t *mask)
{
    if (inject(F_PPOLL))
        return -1;
    REAL(F_PPOLL, ppoll);
    return fn(fds, nfds, ts, mask);
}

int select(int nfds, fd_set *r, fd_set *w, fd_set *x, struct timeval *tv)
{
    if (inject(F_SELECT))
        return -1;
    REAL(F_SELECT, select);
    return fn(nfds, r, w, x, tv);
}

int pipe(int fds[2])
{
    if (inject(F_PIPE))
        return -1;
    REAL(F_PIPE, pipe);
    return fn(fds);
}

int pipe2(int fds[2], int flags)
{
    if (inject(F_PIPE2))
        return -1;
    REAL(F_PIPE2, pipe2);
    return fn(fds, flags);
}
