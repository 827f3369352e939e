/*
 * seccomp_launcher ERRNO -- PROG ARGS...
 *
 * Run PROG where no new process can be created: fork, vfork and clone without
 * CLONE_THREAD fail with ERRNO (a name such as EAGAIN, or a number); threads
 * still work. clone3 fails with ENOSYS, because a filter cannot read its flags
 * (they sit in a struct in user memory, seccomp(2)): glibc's pthread_create and
 * posix_spawn then fall back to clone, which the filter does inspect. With
 * "--clone3-errno" clone3 fails with ERRNO instead (this also breaks threads).
 * A syscall made under another ABI (i386 or x32 on x86_64) kills the process,
 * so the filter cannot be bypassed through other syscall numbers.
 *
 * Build: cc -O2 -o seccomp_launcher seccomp_launcher.c
 * Exit status: PROG's (exec'd in place); 127 with a message if setup fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#else
#error "seccomp_launcher knows x86_64 and aarch64 only"
#endif

#ifndef __NR_clone3
#define __NR_clone3 435
#endif
#ifndef __X32_SYSCALL_BIT
#define __X32_SYSCALL_BIT 0x40000000
#endif

static const struct { const char *name; int value; } errnos[] = {
    {"EAGAIN", EAGAIN}, {"ENOMEM", ENOMEM}, {"EPERM", EPERM}, {"ENOSYS", ENOSYS},
    {"EACCES", EACCES}, {"EINVAL", EINVAL}, {"EINTR", EINTR},
};

static int parse_errno(const char *s)
{
    size_t i;
    char *end;
    long v;
    for (i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
        if (strcmp(s, errnos[i].name) == 0)
            return errnos[i].value;
    v = strtol(s, &end, 10);
    return (*s && !*end && v > 0 && v <= SECCOMP_RET_DATA) ? (int)v : -1;
}

#define LOAD(field) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))
#define RET(value) BPF_STMT(BPF_RET | BPF_K, (value))

int main(int argc, char **argv)
{
    int err, clone3_err = ENOSYS, i = 1;
    if (i < argc && strcmp(argv[i], "--clone3-errno") == 0) {
        clone3_err = -1;
        i++;
    }
    if (argc - i < 3 || strcmp(argv[i + 1], "--") != 0) {
        fprintf(stderr, "usage: %s [--clone3-errno] ERRNO -- PROG ARGS...\n", argv[0]);
        return 127;
    }
    if ((err = parse_errno(argv[i])) < 0) {
        fprintf(stderr, "%s: bad errno %s\n", argv[0], argv[i]);
        return 127;
    }
    if (clone3_err < 0)
        clone3_err = err;

    struct sock_filter filter[] = {
        /* [0] Another ABI's syscall numbers mean other syscalls: refuse them all. */
        LOAD(arch),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0),
        RET(SECCOMP_RET_KILL_PROCESS),
        /* [3] */
        LOAD(nr),
#if defined(__x86_64__)
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, __X32_SYSCALL_BIT, 0, 1),
        RET(SECCOMP_RET_KILL_PROCESS),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_fork, 7, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_vfork, 6, 0),
#endif
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 4, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 1, 0),
        RET(SECCOMP_RET_ALLOW),
        /* clone: flags are the first argument on x86_64 and aarch64 (low 32 bits). */
        LOAD(args[0]),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 2, 1),
        /* clone3 lands here */
        RET(SECCOMP_RET_ERRNO | (clone3_err & SECCOMP_RET_DATA)),
        /* fork, vfork, clone without CLONE_THREAD */
        RET(SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
        RET(SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {
        .len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
        .filter = filter,
    };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("seccomp_launcher: PR_SET_NO_NEW_PRIVS");
        return 127;
    }
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
        perror("seccomp_launcher: seccomp");
        return 127;
    }
    execvp(argv[i + 2], argv + i + 2);
    fprintf(stderr, "seccomp_launcher: exec %s: %s\n", argv[i + 2], strerror(errno));
    return 127;
}
