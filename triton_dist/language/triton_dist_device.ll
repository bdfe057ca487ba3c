; triton-dist device state, linked into every kernel that uses triton_dist.language on the GPU.
;
; @__triton_dist_state is filled by the host after each module is loaded
; (triton_dist/runtime/device_state.py, through cuModuleGetGlobal):
;   [0] rank   [1] world size   [2] watchdog record (device-visible pinned host memory, 0 = none)
;   [3] wait timeout in ns      [4 .. 4+MAX_RANKS) base address of every rank's symmetric heap
; The functions below are called through tl.extern_elementwise and inlined by LLVM.

target triple = "nvptx64-nvidia-cuda"

@__triton_dist_state = addrspace(1) externally_initialized global [68 x i64] zeroinitializer, align 8

declare i64 @llvm.nvvm.read.ptx.sreg.globaltimer()
declare i32 @llvm.nvvm.read.ptx.sreg.smid()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
declare void @llvm.trap()

define i64 @__triton_dist_word(i32 %i) #0 {
  %p = getelementptr inbounds [68 x i64], ptr addrspace(1) @__triton_dist_state, i64 0, i32 %i
  %v = load i64, ptr addrspace(1) %p, align 8
  ret i64 %v
}

define i32 @__triton_dist_rank() #0 {
  %v = call i64 @__triton_dist_word(i32 0)
  %r = trunc i64 %v to i32
  ret i32 %r
}

define i32 @__triton_dist_num_ranks() #0 {
  %v = call i64 @__triton_dist_word(i32 1)
  %r = trunc i64 %v to i32
  ret i32 %r
}

define i64 @__triton_dist_wait_timeout_ns(i32 %unused) #0 {
  %v = call i64 @__triton_dist_word(i32 3)
  ret i64 %v
}

; symm_at: (base[peer] - base[rank]) / elem_bytes, the element offset that moves a pointer into this rank's
; heap onto the same object in peer's heap. Bases are page aligned, so the division is exact.
define i64 @__triton_dist_peer_delta(i32 %peer, i32 %elem_bytes) #0 {
  %me = call i32 @__triton_dist_rank()
  %i_me = add i32 %me, 4
  %i_peer = add i32 %peer, 4
  %base_me = call i64 @__triton_dist_word(i32 %i_me)
  %base_peer = call i64 @__triton_dist_word(i32 %i_peer)
  %bytes = sub i64 %base_peer, %base_me
  %es = sext i32 %elem_bytes to i64
  %res = sdiv exact i64 %bytes, %es
  ret i64 %res
}

; Called after every spin-wait with its outcome; if it timed out, record who waited on what in the
; watchdog record (the last writer wins; every thread of a program waits on the same signal) and trap, so the process fails instead of hanging.
;   record: [0] flag (2 = complete) [1] rank [2] signal address [3] expected [4] last value seen [5] SM id
;           [6] program id (ctaid.x) [7] programs in the launch (nctaid.x)
define i64 @__triton_dist_check_wait(i32 %timed_out, i64 %addr, i64 %expected, i64 %seen) #1 {
entry:
  %t = icmp ne i32 %timed_out, 0
  br i1 %t, label %report, label %ok
ok:
  ret i64 %seen
report:
  %rec_i = call i64 @__triton_dist_word(i32 2)
  %has = icmp ne i64 %rec_i, 0
  br i1 %has, label %write, label %die
write:
  ; plain volatile stores, no atomics: the record is host memory, where PCIe may not carry atomics
  %rec = inttoptr i64 %rec_i to ptr
  br label %fill
fill:
  %me = call i32 @__triton_dist_rank()
  %me64 = sext i32 %me to i64
  %p1 = getelementptr i64, ptr %rec, i64 1
  store volatile i64 %me64, ptr %p1
  %p2 = getelementptr i64, ptr %rec, i64 2
  store volatile i64 %addr, ptr %p2
  %p3 = getelementptr i64, ptr %rec, i64 3
  store volatile i64 %expected, ptr %p3
  %p4 = getelementptr i64, ptr %rec, i64 4
  store volatile i64 %seen, ptr %p4
  %sm = call i32 @llvm.nvvm.read.ptx.sreg.smid()
  %sm64 = zext i32 %sm to i64
  %p5 = getelementptr i64, ptr %rec, i64 5
  store volatile i64 %sm64, ptr %p5
  %pid = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %pid64 = zext i32 %pid to i64
  %p6 = getelementptr i64, ptr %rec, i64 6
  store volatile i64 %pid64, ptr %p6
  %npid = call i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
  %npid64 = zext i32 %npid to i64
  %p7 = getelementptr i64, ptr %rec, i64 7
  store volatile i64 %npid64, ptr %p7
  fence seq_cst
  store volatile i64 2, ptr %rec
  fence seq_cst
  br label %die
die:
  call void @llvm.trap()
  unreachable
}

; A device-side agreement check (dl.check_agree): if this rank's value differs from the one a peer published, record
; it for the host (flag 3; the host raises CallMismatch) and trap, as a timed-out wait does.
;   record: [0] flag 3 [1] rank [2] check code [3] mine [4] theirs [5] peer [6] program id [7] programs
define i64 @__triton_dist_check_agree(i64 %mine, i64 %theirs, i32 %peer, i32 %code) #1 {
entry:
  %same = icmp eq i64 %mine, %theirs
  br i1 %same, label %ok, label %report
ok:
  ret i64 %mine
report:
  %rec_i = call i64 @__triton_dist_word(i32 2)
  %has = icmp ne i64 %rec_i, 0
  br i1 %has, label %write, label %die
write:
  %rec = inttoptr i64 %rec_i to ptr
  %me = call i32 @__triton_dist_rank()
  %me64 = sext i32 %me to i64
  %p1 = getelementptr i64, ptr %rec, i64 1
  store volatile i64 %me64, ptr %p1
  %code64 = sext i32 %code to i64
  %p2 = getelementptr i64, ptr %rec, i64 2
  store volatile i64 %code64, ptr %p2
  %p3 = getelementptr i64, ptr %rec, i64 3
  store volatile i64 %mine, ptr %p3
  %p4 = getelementptr i64, ptr %rec, i64 4
  store volatile i64 %theirs, ptr %p4
  %peer64 = sext i32 %peer to i64
  %p5 = getelementptr i64, ptr %rec, i64 5
  store volatile i64 %peer64, ptr %p5
  %pid = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %pid64 = zext i32 %pid to i64
  %p6 = getelementptr i64, ptr %rec, i64 6
  store volatile i64 %pid64, ptr %p6
  %npid = call i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
  %npid64 = zext i32 %npid to i64
  %p7 = getelementptr i64, ptr %rec, i64 7
  store volatile i64 %npid64, ptr %p7
  fence seq_cst
  store volatile i64 3, ptr %rec
  fence seq_cst
  br label %die
die:
  call void @llvm.trap()
  unreachable
}

attributes #0 = { alwaysinline nounwind }
attributes #1 = { nounwind }
