/*
 * subreaper -- PROG ARGS...
 *
 * Run PROG as a child and contain everything it leaves behind. This machine's
 * init does not reap orphans, so a descendant that outlives a test would stay
 * a zombie for good; under this launcher it is reparented here instead
 * (PR_SET_CHILD_SUBREAPER, prctl(2)) and reaped.
 *
 * While PROG runs, adopted orphans are reaped as they exit. When PROG ends,
 * every descendant still there is SIGKILLed and reaped, and one line
 *     subreaper: leftover N (zombie Z)
 * is written to stderr if N > 0 (Z of them were already zombies). SIGTERM or
 * SIGINT to this process does the same cleanup at once (PROG included).
 *
 * Exit status: PROG's; if PROG was killed by a signal, this process kills
 * itself with the same signal (core dumps off), so callers see -N as usual.
 *
 * Build: cc -O2 -o subreaper subreaper.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* Return the /proc state letter of pid, or 0 if it is gone. */
static char proc_state(pid_t pid)
{
    char path[64], buf[512], *p;
    FILE *f;
    size_t n;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return 0;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strrchr(buf, ')');
    return (p && p[1] == ' ') ? p[2] : 0;
}

/* SIGKILL and reap every current child; count them (and the zombies among them). */
static int kill_children(int *zombies)
{
    char path[300], buf[4096], *tok, *save;
    DIR *d;
    struct dirent *e;
    FILE *f;
    int found = 0, status;
    size_t n;
    if ((d = opendir("/proc/self/task")) == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/self/task/%s/children", e->d_name);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = '\0';
        for (tok = strtok_r(buf, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
            pid_t pid = (pid_t)atoi(tok);
            if (proc_state(pid) == 'Z')
                (*zombies)++;
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            found++;
        }
    }
    closedir(d);
    return found;
}

/*
 * Kill and reap every descendant. Killing a child reparents its own children
 * here, so repeat until waitpid reports that no child is left.
 */
static int clean_up(int *zombies)
{
    int leftover = 0, status;
    pid_t pid;
    for (;;) {
        leftover += kill_children(zombies);
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
            leftover++;
        if (pid < 0 && errno == ECHILD)
            return leftover;
        usleep(1000);
    }
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    struct rlimit no_core = {0, 0};
    pid_t main_pid, pid;
    int status = 0, main_status = 0, zombies = 0, leftover;
    if (argc < 3 || strcmp(argv[1], "--") != 0) {
        fprintf(stderr, "usage: %s -- PROG ARGS...\n", argv[0]);
        return 127;
    }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        perror("subreaper: PR_SET_CHILD_SUBREAPER");
        return 127;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop;  /* no SA_RESTART: interrupt waitpid */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    main_pid = fork();
    if (main_pid < 0) {
        perror("subreaper: fork");
        return 127;
    }
    if (main_pid == 0) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        execvp(argv[2], argv + 2);
        fprintf(stderr, "subreaper: exec %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    while (!stop_requested) {
        pid = waitpid(-1, &status, 0);
        if (pid == main_pid) {
            main_status = status;
            break;
        }
        if (pid < 0 && errno != EINTR)
            break;
    }
    if (stop_requested)
        main_status = SIGKILL;  /* as if killed: PROG is killed below */
    leftover = clean_up(&zombies);
    if (stop_requested)
        leftover = leftover > 0 ? leftover - 1 : 0;  /* PROG itself is no leftover */
    if (leftover > 0)
        fprintf(stderr, "subreaper: leftover %d (zombie %d)\n", leftover, zombies);
    if (WIFSIGNALED(main_status)) {
        setrlimit(RLIMIT_CORE, &no_core);
        signal(WTERMSIG(main_status), SIG_DFL);
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        kill(getpid(), WTERMSIG(main_status));
    }
    return WIFEXITED(main_status) ? WEXITSTATUS(main_status) : 127;
}
