/* The exec path's child side; see spawn.h.
 *
 * Process creation. On Linux the child is made with clone(CLONE_VM |
 * CLONE_VFORK | SIGCHLD) on a small stack of its own (one per calling
 * thread, kept for its next spawn), as glibc's posix_spawn does: it shares
 * the parent's memory until it execs or exits, so no page tables are copied
 * and the cost does not grow with the parent's size. The calling thread is
 * suspended meanwhile. Elsewhere (and when use_fork is set) a plain fork()
 * runs the same child code.
 *
 * Everything between creation and execve() is async-signal-safe: plain system
 * calls on memory the parent prepared, no malloc, no stdio, no strerror. A
 * child sharing the parent's memory must also never run one of the parent's
 * signal handlers, hence the mask dance in ff_spawn() and reset_signals().
 */
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#ifdef __linux__
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#define FF_HAVE_CLONE_VFORK 1
/* Plenty for run_child()'s frames and the libc wrappers it calls: nothing
 * large lives on the child's stack (argv/envp stay in the parent's memory). */
#define FF_STACK_SIZE (64 * 1024)
#endif

#ifdef _NSIG
#define FF_NSIG _NSIG
#else
#define FF_NSIG NSIG
#endif

extern char **environ;

/* Report (step, err) and exit 127, as a shell does for a command it could
 * not run. A child sharing the parent's memory writes the report there (the
 * parent reads it once clone() returns, as glibc's posix_spawn does), which
 * saves a pipe per spawn; a forked child writes it to the error pipe. */
static void fail(const ff_spawn_plan *p, volatile int *report, int step, int err)
{
    int msg[2] = {step, err};
    const char *buf = (const char *)msg;
    size_t left = sizeof(msg);
    if (report != NULL) {
        report[0] = step;
        report[1] = err;
        _exit(127);
    }
    while (left > 0) {
        ssize_t n = write(p->errpipe, buf, left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        buf += n;
        left -= (size_t)n;
    }
    _exit(127);
}

/* Signals the Python interpreter ignores at startup: put back to SIG_DFL, as
 * subprocess does with restore_signals=True (CPython's _Py_RestoreSignals). */
static int python_ignored(int sig)
{
    if (sig == SIGPIPE || sig == SIGXFSZ)
        return 1;
#ifdef SIGXFZ
    if (sig == SIGXFZ)
        return 1;
#endif
    return 0;
}

/* Reset every caught signal to SIG_DFL: a handler of the parent must never run
 * in a child that shares its memory (after exec the kernel would reset them
 * anyway). Ignored signals stay ignored -- an inherited SIG_IGN (nohup) is the
 * caller's choice -- except those Python itself ignores. Mirrors
 * reset_signal_handlers() in CPython's Modules/_posixsubprocess.c. */
static void reset_signals(void)
{
    struct sigaction sa;
    int sig;
    for (sig = 1; sig < FF_NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        /* libc returns EINVAL for its internal signals: nothing to do there. */
        if (sigaction(sig, NULL, &sa) == -1)
            continue;
        if (sa.sa_handler == SIG_DFL)
            continue;
        if (sa.sa_handler == SIG_IGN && !python_ignored(sig))
            continue;
        sa.sa_handler = SIG_DFL;
        sa.sa_flags = 0;
        sigemptyset(&sa.sa_mask);
        sigaction(sig, &sa, NULL);
    }
}

static int set_inheritable(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0)
        return -1;
    if ((flags & FD_CLOEXEC) && fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) < 0)
        return -1;
    return 0;
}

/* Close fds lo..hi (inclusive; hi may be INT_MAX). */
static void close_span(const ff_spawn_plan *p, int lo, int hi)
{
    int fd, top;
    if (lo > hi)
        return;
#ifdef SYS_close_range
    /* Linux 5.9+: one system call whatever the fd limit. */
    if (syscall(SYS_close_range, (unsigned int)lo,
                hi == INT_MAX ? ~0U : (unsigned int)hi, 0) == 0)
        return;
#endif
    /* Older kernels and other systems: one close() per possible fd, up to the
     * limit the parent looked up (sysconf is not async-signal-safe). */
    top = hi < p->max_fd ? hi : p->max_fd;
    for (fd = lo; fd <= top; fd++)
        close(fd);
}

/* Close lo..hi except the error pipe, which closes itself at exec. */
static void close_gap(const ff_spawn_plan *p, int lo, int hi)
{
    if (p->errpipe >= lo && p->errpipe <= hi) {
        close_span(p, lo, p->errpipe - 1);
        close_span(p, p->errpipe + 1, hi);
    } else {
        close_span(p, lo, hi);
    }
}

/* Put the planned fds at 0, 1, 2; keep keep_fds (inheritable); close the rest.
 * Returns 0, or -1 with errno and *step the step that failed. */
static int apply_fds(const ff_spawn_plan *p, int *step)
{
    int src[3];
    int i, lo, devnull = -1;
    *step = FF_STEP_FDS;
    for (i = 0; i < 3; i++) {
        src[i] = p->stdio[i];
        if (src[i] == FF_STDIO_DEVNULL) {
            /* One open for every entry asking; close-on-exec, so only the
             * dup2 copies outlive the exec. */
            if (devnull < 0) {
                devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
                if (devnull < 0) {
                    *step = FF_STEP_DEVNULL;
                    return -1;
                }
            }
            src[i] = devnull;
        }
    }
    /* A source that is itself 0, 1 or 2 could be overwritten by an earlier
     * dup2 (CPython issue #12607): move such sources above 2 first. */
    for (i = 0; i < 3; i++) {
        if (src[i] >= 0 && src[i] < 3 && src[i] != i) {
            src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 3);
            if (src[i] < 0)
                return -1;
        }
    }
    for (i = 0; i < p->n_keep_fds; i++) {
        if (set_inheritable(p->keep_fds[i]) < 0)
            return -1;
    }
    for (i = 0; i < 3; i++) {
        if (src[i] < 0)
            continue;
        /* dup2 onto itself is a no-op that keeps FD_CLOEXEC: clear it by hand. */
        if (src[i] == i) {
            if (set_inheritable(i) < 0)
                return -1;
        } else if (dup2(src[i], i) < 0) {
            return -1;
        }
    }
    if (p->close_fds) {
        lo = 3;
        for (i = 0; i < p->n_keep_fds; i++) {
            if (p->keep_fds[i] < lo)
                continue;
            close_gap(p, lo, p->keep_fds[i] - 1);
            lo = p->keep_fds[i] + 1;
        }
        close_gap(p, lo, INT_MAX);
    }
    return 0;
}

/* The child: apply the plan and exec; never returns. ``report``: where to
 * report a failure in shared memory, or NULL for the error pipe. */
static void run_child(const ff_spawn_plan *p, volatile int *report)
{
    sigset_t none;
    char *const *envp;
    char *const *path;
    int err, step, saved = 0;

    reset_signals();
    if (apply_fds(p, &step) < 0)
        fail(p, report, step, errno);
    if (p->cwd != NULL && chdir(p->cwd) < 0)
        fail(p, report, FF_STEP_CWD, errno);
    if (p->new_session && setsid() < 0)
        fail(p, report, FF_STEP_SETSID, errno);
#ifdef __linux__
    if (p->pdeathsig > 0) {
        if (prctl(PR_SET_PDEATHSIG, (unsigned long)p->pdeathsig, 0UL, 0UL, 0UL) < 0)
            fail(p, report, FF_STEP_PDEATHSIG, errno);
        /* The parent may have died before the request took effect: then the
         * signal will never come, and nobody waits for a report. */
        if (getppid() != p->parent)
            _exit(127);
    }
#endif
    /* The command starts with an empty signal mask (not the caller's thread
     * mask, which subprocess keeps): a command started from a thread that
     * blocks SIGTERM must still stop on terminate(). */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    envp = p->envp != NULL ? p->envp : environ;
    err = ENOENT;  /* reported if there is no candidate at all */
    for (path = p->paths; *path != NULL; path++) {
        execve(*path, p->argv, envp);
        err = errno;
        /* Like os.execvpe and _posixsubprocess: report the first error that is
         * not "not there", else the last one. */
        if (err != ENOENT && err != ENOTDIR && saved == 0)
            saved = err;
    }
    fail(p, report, FF_STEP_EXEC, saved != 0 ? saved : err);
}

#ifdef FF_HAVE_CLONE_VFORK
typedef struct {
    const ff_spawn_plan *plan;
    volatile int *report;
} child_args;

static int clone_main(void *arg)
{
    const child_args *args = (const child_args *)arg;
    run_child(args->plan, args->report);
    return 127;  /* not reached */
}
#endif

#ifdef FF_HAVE_CLONE_VFORK
/* Each thread maps its clone stack once and keeps it until it exits (the key's
 * destructor unmaps it): a fresh mapping per spawn costs an mmap, a munmap and
 * page faults on every call. Reuse is safe because CLONE_VFORK returns only
 * once the child has exec'd or exited, and one thread runs one ff_spawn() at
 * a time. */
static pthread_key_t stack_key;
static pthread_once_t stack_once = PTHREAD_ONCE_INIT;
static int have_stack_key;

static void unmap_stack(void *stack)
{
    munmap(stack, FF_STACK_SIZE);
}

static void make_stack_key(void)
{
    have_stack_key = pthread_key_create(&stack_key, unmap_stack) == 0;
}

/* The calling thread's clone stack, or NULL with errno. *kept is 0 when the
 * caller must unmap it after use (no thread key to keep it in). */
static void *thread_stack(int *kept)
{
    void *stack;
    pthread_once(&stack_once, make_stack_key);
    if (have_stack_key) {
        stack = pthread_getspecific(stack_key);
        if (stack != NULL) {
            *kept = 1;
            return stack;
        }
    }
    stack = mmap(NULL, FF_STACK_SIZE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return NULL;
    *kept = have_stack_key && pthread_setspecific(stack_key, stack) == 0;
    return stack;
}
#endif

pid_t ff_spawn(const ff_spawn_plan *plan, int report[2], int *pidfd)
{
    sigset_t all, old;
    pid_t pid = -1;
    int saved_errno = 0;

    report[0] = report[1] = 0;
    if (pidfd != NULL)
        *pidfd = -1;

    /* No signal handler may run in the child before reset_signals(): with
     * CLONE_VM it would run on the parent's memory (glibc's posix_spawn does
     * the same). The parent's own signals wait until the mask is restored. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
#ifdef FF_HAVE_CLONE_VFORK
    if (!plan->use_fork) {
        int kept = 0;
        void *stack = thread_stack(&kept);
        child_args args = {plan, report};
        if (stack == NULL) {
            saved_errno = errno;
        } else {
            /* clone() takes the end the stack grows from (the top, except on
             * hppa). CLONE_VFORK: we resume once the child has exec'd or
             * exited, so the stack is free again right after. */
#if defined(__hppa__)
            char *top = (char *)stack;
#else
            char *top = (char *)stack + FF_STACK_SIZE;
#endif
            int flags = CLONE_VM | CLONE_VFORK | SIGCHLD;
#ifdef CLONE_PIDFD
            /* The pidfd comes with the child (Linux 5.2+): no moment when a
             * child reaped by someone else (SIGCHLD ignored) could leave its
             * pid to another process before we hold it. */
            if (pidfd != NULL)
                flags |= CLONE_PIDFD;
#endif
            pid = clone(clone_main, top, flags, &args, pidfd);
            saved_errno = errno;
            if (!kept)
                munmap(stack, FF_STACK_SIZE);
        }
    } else
#endif
    {
        pid = fork();
        saved_errno = errno;
        if (pid == 0)
            run_child(plan, NULL);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = saved_errno;
    return pid;
}

int ff_spawn_uses_vfork(void)
{
#ifdef FF_HAVE_CLONE_VFORK
    return 1;
#else
    return 0;
#endif
}
