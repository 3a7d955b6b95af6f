/* The pod sandbox ("pause") process for scripts/k8s-cluster.sh: no image can be pulled here, so the
 * cluster's sandbox image is built locally from this file (gcc -static) and imported into containerd.
 * It does what registry.k8s.io/pause does: holds the pod's namespaces, reaps zombies (it is PID 1
 * when the pod shares its PID namespace) and exits 0 on SIGTERM/SIGINT. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }
static void on_chld(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(int argc, char **argv) {
  (void)argc; (void)argv;
  struct sigaction term = {0}, chld = {0};
  term.sa_handler = on_term;
  chld.sa_handler = on_chld;
  chld.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGTERM, &term, 0) || sigaction(SIGINT, &term, 0) || sigaction(SIGCHLD, &chld, 0))
    return 1;
  for (;;) pause();
}
