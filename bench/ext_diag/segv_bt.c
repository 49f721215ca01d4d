// LD_PRELOAD=segv_bt.so: on SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGABRT print the faulting address,
// the registers that matter and a native backtrace with "library+offset" for every frame
// (offsets feed `addr2line -Cfie LIB OFFSET` / `objdump -d` on the machine that has LIB).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static char altstack[1 << 16];

static void frame(int fd, int i, void* pc) {
  Dl_info info;
  char buf[1024];
  if (dladdr(pc, &info) && info.dli_fname) {
    unsigned long off = (unsigned long)pc - (unsigned long)info.dli_fbase;
    long soff = info.dli_saddr ? (long)((char*)pc - (char*)info.dli_saddr) : -1;
    snprintf(buf, sizeof buf, "  #%-2d %p %s+0x%lx  (%s+0x%lx)\n", i, pc, info.dli_fname, off,
             info.dli_sname ? info.dli_sname : "?", soff);
  } else {
    snprintf(buf, sizeof buf, "  #%-2d %p ?\n", i, pc);
  }
  (void)!write(fd, buf, strlen(buf));
}

static void handler(int sig, siginfo_t* si, void* uc_) {
  ucontext_t* uc = (ucontext_t*)uc_;
  char buf[512];
  int fd = 2;
  void* rip = (void*)uc->uc_mcontext.gregs[REG_RIP];
  snprintf(buf, sizeof buf, "\n*** segv_bt: signal %d (%s) si_addr=%p code=%d rip=%p rsp=%p rdi=%p rsi=%p rax=%p\n", sig,
           strsignal(sig), si->si_addr, si->si_code, rip, (void*)uc->uc_mcontext.gregs[REG_RSP],
           (void*)uc->uc_mcontext.gregs[REG_RDI], (void*)uc->uc_mcontext.gregs[REG_RSI],
           (void*)uc->uc_mcontext.gregs[REG_RAX]);
  (void)!write(fd, buf, strlen(buf));
  frame(fd, 0, rip);
  void* pcs[64];
  int n = backtrace(pcs, 64);
  for (int i = 0; i < n; ++i) frame(fd, i + 1, pcs[i]);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  void* warm[2];
  backtrace(warm, 2);  // loads libgcc_s now, not inside the handler
  stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
  for (unsigned i = 0; i < sizeof sigs / sizeof *sigs; ++i) sigaction(sigs[i], &sa, NULL);
}
