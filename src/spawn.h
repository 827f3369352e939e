/* The exec path's child side: create a process that runs a prepared plan and execs.
 *
 * The parent prepares everything (argv/envp arrays, candidate paths from the
 * PATH lookup, the fd plan) before calling ff_spawn(); the child only makes
 * async-signal-safe system calls on that plan, then execs or reports why it
 * could not over a close-on-exec pipe and _exit(127)s.
 */
#ifndef FASTFORK_SPAWN_H
#define FASTFORK_SPAWN_H

#include <sys/types.h>

/* Which step of the child failed (the first int of the error report). */
enum {
    FF_STEP_FDS = 1,       /* applying the fd plan (dup2/fcntl) */
    FF_STEP_CWD = 2,       /* chdir(cwd): the filename is the cwd */
    FF_STEP_SETSID = 3,    /* setsid() */
    FF_STEP_PDEATHSIG = 4, /* prctl(PR_SET_PDEATHSIG) */
    FF_STEP_EXEC = 5,      /* execve() of every candidate: the filename is the program */
    FF_STEP_DEVNULL = 6,   /* opening /dev/null for FF_STDIO_DEVNULL */
};

/* A stdio entry: the child opens /dev/null there itself (saving the parent an
 * open and a close per spawn). */
#define FF_STDIO_DEVNULL (-2)

typedef struct {
    char *const *paths;   /* candidate executables, tried in order; NULL-terminated */
    char *const *argv;    /* NULL-terminated */
    char *const *envp;    /* NULL-terminated, or NULL to pass the parent's environ */
    const char *cwd;      /* chdir() here first, or NULL */
    int stdio[3];         /* fd to place at 0, 1, 2; -1 leaves that fd as inherited,
                             FF_STDIO_DEVNULL opens /dev/null there */
    const int *keep_fds;  /* sorted ascending: fds made inheritable and kept open */
    int n_keep_fds;
    int close_fds;        /* close every fd >= 3 not in keep_fds */
    int max_fd;           /* highest fd to close where close_range() is missing */
    int new_session;      /* setsid() */
    int pdeathsig;        /* > 0: PR_SET_PDEATHSIG (Linux), then re-check the parent */
    pid_t parent;         /* getpid() of the parent, for that re-check */
    int errpipe;          /* write end of the close-on-exec error pipe (>= 3); only
                             for a child made by fork(), else -1 (see ff_spawn) */
    int use_fork;         /* use fork() even where vfork-style creation exists */
} ff_spawn_plan;

/* Create the child. Returns its pid, or -1 with errno set if no process could
 * be created. If ``pidfd`` is not NULL, *pidfd receives a close-on-exec pidfd
 * for a vfork-style child (CLONE_PIDFD), else -1 (fork(), or a kernel without
 * CLONE_PIDFD, which ignores the flag). A child that cannot exec reports (step, errno) and exits 127.
 * A vfork-style child (ff_spawn_uses_vfork() and not use_fork) shares our
 * memory and writes the report into report[] before ff_spawn() returns:
 * (0, 0) means the exec succeeded. A child made by fork() writes it to
 * errpipe instead; end of file there means the exec succeeded.
 * Signals are blocked in the calling thread while the child shares its memory.
 * Safe to call without the GIL. */
pid_t ff_spawn(const ff_spawn_plan *plan, int report[2], int *pidfd);

/* 1 if ff_spawn() creates children with vfork-style semantics here, else 0. */
int ff_spawn_uses_vfork(void);

#endif
