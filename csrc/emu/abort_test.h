// Death tests of the emulator's C++ tests (test_simt.cpp, test_count.cpp).
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace rk::emu::testing {

// Runs `fn` in a child process; true when it aborted with `expect` in its stderr.
template <typename F>
bool aborts_with(F fn, const char* expect) {
  int pipe_fd[2];
  if (pipe(pipe_fd) != 0) return false;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(pipe_fd[1], 2);
    close(pipe_fd[0]);
    fn();
    std::_Exit(0);
  }
  close(pipe_fd[1]);
  std::string err;
  char buf[512];
  ssize_t got;
  while ((got = read(pipe_fd[0], buf, sizeof(buf))) > 0) err.append(buf, got);
  close(pipe_fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  bool aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
  if (!aborted || err.find(expect) == std::string::npos)
    std::fprintf(stderr, "expected an abort with '%s'; got status %d and: %s\n", expect, status,
                 err.c_str());
  return aborted && err.find(expect) != std::string::npos;
}

}  // namespace rk::emu::testing
