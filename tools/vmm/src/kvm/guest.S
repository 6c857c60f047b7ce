# ferry's built-in KVM guest program (x86-64, runs at CPL 3 in long mode).
#
# Assembled into guest.bin, which the engine embeds; a unit test reassembles
# this file with GNU as when it is installed and checks the two agree:
#   as --64 -o guest.o guest.S && objcopy -O binary -j .text guest.o guest.bin
#
# The VMM loads it at CODE (0x6000) and starts every vCPU there with
# rdi = vCPU id, rflags.IOPL = 3 (so `out` exits to the VMM) and no IDT: a
# fault is a triple fault, which the VMM reports as a crash.
#
# Memory it uses (guest-physical = guest-virtual, identity mapped):
#   PARAMS  0x5800  written by the VMM at boot, read-only to the guest:
#     +0x00 data_start   +0x08 data_end      (bytes, 16-aligned)
#     +0x10 hot_start    +0x18 hot_pages     (the hot set it keeps writing)
#     +0x20 tsc_per_write (0: no writes)     +0x28 tsc_per_beat
#     +0x30 seed (non-zero)
#   SLOT    0x5000 + 64 * id, one per vCPU:
#     +0x00 heartbeat    +0x08 checksum request (the VMM bumps it)
#     +0x10 checksum ack +0x18 checksum      +0x20 filled
#     +0x28 rng state    +0x30 writes made
# Ports (out only; eax carries the low half of the value, the VMM reads the
# whole of it from the slot): 0x10 heartbeat, 0x11 checksum done,
# 0x12 memory filled, 0x13 idle: nothing is due for eax TSC ticks (the VMM
# may sleep that long, as for a HLT with a timer: the guest does not spin
# a host core while it waits).
#
# vCPU 0 fills [data_start, data_end) with xorshift64 output once, then
# loops: answer a checksum request (a 2-lane multiply-rotate hash of the
# data region, computed by the guest itself, then report it), beat the
# heartbeat every tsc_per_beat ticks, and write one 8-byte word into a
# random page of the hot set every tsc_per_write ticks. Other vCPUs only
# beat. After a checksum report the next thing the guest does is look at
# the request counter again, so a VMM that stops the vCPU on that report
# and asks again after a restore gets the checksum of the same memory.

    .intel_syntax noprefix
    .code64
    .text

    # rax = xorshift64(rax), clobbers rdx (the fill and the writes).
    .macro xorshift64
    mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    .endm

    .equ MAILBOX, 0x5000
    .equ PARAMS, 0x5800

start:
    mov rbp, rdi
    shl rbp, 6
    add rbp, MAILBOX
    mov r15, PARAMS
    mov r14, rdi
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r12, rax                 # next write deadline
    mov r13, rax                 # next heartbeat deadline
    test r14, r14
    jnz tick
    cmp qword ptr [rbp + 0x20], 0
    jne tick

    mov rdi, [r15 + 0x00]
    mov rsi, [r15 + 0x08]
    mov rax, [r15 + 0x30]
fill:
    xorshift64
    mov [rdi], rax
    add rdi, 8
    cmp rdi, rsi
    jb fill
    mov [rbp + 0x28], rax
    mov qword ptr [rbp + 0x20], 1
    mov dx, 0x12
    out dx, eax

tick:
    test r14, r14
    jnz beat
    mov rax, [rbp + 0x08]
    cmp rax, [rbp + 0x10]
    je beat

    # Checksum of the data region (registers only: no memory is written
    # until the result is stored in the slot).
    mov rsi, [r15 + 0x00]
    mov rdi, [r15 + 0x08]
    movabs rax, 0x9e3779b97f4a7c15
    movabs r9, 0x7f4a7c159e3779b9
    movabs r8, 0xff51afd7ed558ccd
sum:
    xor rax, [rsi]
    imul rax, r8
    rol rax, 31
    xor r9, [rsi + 8]
    imul r9, r8
    rol r9, 29
    add rsi, 16
    cmp rsi, rdi
    jb sum
    imul r9, r8
    add rax, r9
    mov [rbp + 0x18], rax
    mov rcx, [rbp + 0x08]
    mov [rbp + 0x10], rcx
    mov dx, 0x11
    out dx, eax
    jmp tick

beat:
    rdtsc
    shl rdx, 32
    or rax, rdx                  # rax = now
    mov rbx, [r15 + 0x28]
    mov rcx, rax
    sub rcx, r13                 # now - deadline
    jns 1f
    # Not due, unless the TSC went back a long way (then start over).
    mov rdx, rbx
    shl rdx, 2
    add rcx, rdx
    jns write
1:
    mov r13, rax
    add r13, rbx
    mov rbx, rax
    inc qword ptr [rbp + 0x00]
    mov eax, [rbp + 0x00]
    mov dx, 0x10
    out dx, eax
    mov rax, rbx

write:
    mov rcx, r13
    sub rcx, rax                 # ticks to the next heartbeat
    test r14, r14
    jnz idle
    mov rbx, [r15 + 0x20]
    test rbx, rbx
    jz idle
    mov rcx, rax
    sub rcx, r12                 # now - deadline
    jns 3f
    neg rcx                      # ticks to the next write
    mov rdx, r13
    sub rdx, rax
    cmp rdx, rcx
    jae idle
    mov rcx, rdx                 # the heartbeat comes first
    jmp idle
3:
    # Far behind (after a pause): do not burst, start over from now.
    mov rdx, rbx
    shl rdx, 6
    cmp rcx, rdx
    jb 2f
    mov r12, rax
2:
    add r12, rbx
    mov rax, [rbp + 0x28]
    xorshift64
    mov [rbp + 0x28], rax
    mov rbx, rax
    mul qword ptr [r15 + 0x18]   # rdx = page index in the hot set
    shl rdx, 12
    add rdx, [r15 + 0x10]
    mov rcx, rbx
    and rcx, 0xff8
    mov [rdx + rcx], rbx
    inc qword ptr [rbp + 0x30]
    jmp tick

idle:
    # rcx = ticks until something is due (may be <= 0 when just late).
    test rcx, rcx
    jle tick
    mov rdx, 0x7fffffff
    cmp rcx, rdx
    cmova rcx, rdx
    mov eax, ecx
    mov dx, 0x13
    out dx, eax
    jmp tick
