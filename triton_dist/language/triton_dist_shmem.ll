; triton-dist's own implementation of the NVSHMEM device functions that triton_dist.language.libshmem_device calls,
; for the "cuda" backend: peers are intra-node ranks whose heaps are mapped into this process over CUDA IPC
; (several ranks may share one GPU), so every remote access is a plain load/store/atomic on a translated address.
; On the "nvshmem" backend NVSHMEM's libnvshmem_device.bc is linked instead; _compile.install(shmem=...) picks one
; per process.
;
; Contract with the callers (triton_dist/language/_shmem_ptx.py):
;   * signatures are exactly what Triton declares for the extern calls: pointers are i64 addresses, pe is i32,
;     nbytes i64, a uint64 signal is i64, sig_op and cmp are i32; functions that NVSHMEM declares void return
;     i32 0. The public nvshmem* functions are thin alwaysinline wrappers, so no nvshmem name survives in the PTX.
;   * thread-level functions (putmem, getmem, putmem_signal, their _nbi forms, signal_op, barrier_all, sync_all)
;     are called by thread 0 only, between two CTA barriers; _warp functions by warp 0 (tid.x < 32), between two
;     CTA barriers; _block functions, signal_wait_until, fence, quiet, my_pe, n_pes and nvshmem_ptr by every
;     thread of the (1-D) block.
;   * @__triton_dist_state and @__triton_dist_check_wait are defined in triton_dist_device.ll, which the stage
;     hook always links AFTER this file (Triton links extern libraries in order, LinkOnlyNeeded):
;       state: [0] rank  [1] world size  [2] watchdog record  [3] wait timeout (ns)  [4 + pe] heap base of pe
;
; Semantics (the CPU world's _shmem_interp.py is the reference):
;   * peer address of a local symmetric address:  addr - base[my rank] + base[pe].
;   * copies: 16-byte vector loads/stores when dst, src and nbytes are all 16-byte aligned, else bytes; the
;     lanes of the caller (1 thread, 32 lanes of a warp, ntid.x threads of a block) split the copy. A copy is
;     complete when the function returns, so the _nbi forms equal the blocking ones and quiet/fence only order.
;   * putmem_signal: copy, sync the participating threads, then one thread does fence.acq_rel.sys and the signal
;     update on the peer with release semantics at system scope: NVSHMEM_SIGNAL_SET (9) = atomic exchange,
;     NVSHMEM_SIGNAL_ADD (10) = atomic add; any other sig_op traps (the Python side rejects constant ones).
;   * signal_wait_until: every thread polls the local signal with ld.acquire.sys until the unsigned 64-bit
;     comparison holds (NVSHMEM_CMP_EQ 0, NE 1, GT 2, LE 3, LT 4, GE 5; anything else traps), with dl.wait's
;     timeout: after word [3] ns of globaltimer, __triton_dist_check_wait records the wait and traps.
;   * barrier_all / sync_all: slots in the reserved start of every rank's heap (the host zeroes them at init;
;     the offsets are SHMEM_BARRIER_SLOTS = 0 and SHMEM_BARRIER_COUNTER = 512 of triton_dist/runtime/heap.py,
;     keep them in step):  base[r] + 8*p  (int64) = the epoch of PE p's last barrier, as seen by PE r;
;                          base[r] + 512  (int64) = PE r's own barrier epoch counter.
;     fence.acq_rel.sys; e = ++counter; write e into slot [my rank] of every PE (relaxed, after the fence);
;     wait (acquire) until every slot of my heap is >= e (signed). The counter is bumped with an atomic add and the
;     slots raised with an atomic max, so programs of one kernel that barrier concurrently cannot corrupt them
;     (each then waits for its own arrival index on every PE); NVSHMEM itself allows one caller per PE at a time.

target triple = "nvptx64-nvidia-cuda"

@__triton_dist_state = external addrspace(1) global [68 x i64], align 8
declare i64 @__triton_dist_check_wait(i32, i64, i64, i64)

declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
declare void @llvm.nvvm.barrier0()
declare void @llvm.nvvm.bar.warp.sync(i32)
declare void @llvm.trap()

; ---------------------------------------------------------------------------------------------------------------
; State, addresses, PTX primitives

define internal i64 @__tds_word(i32 %i) #0 {
  %p = getelementptr inbounds [68 x i64], ptr addrspace(1) @__triton_dist_state, i64 0, i32 %i
  %v = load i64, ptr addrspace(1) %p, align 8
  ret i64 %v
}

define internal i32 @__tds_rank() #0 {
  %v = call i64 @__tds_word(i32 0)
  %r = trunc i64 %v to i32
  ret i32 %r
}

define internal i32 @__tds_npes() #0 {
  %v = call i64 @__tds_word(i32 1)
  %r = trunc i64 %v to i32
  ret i32 %r
}

define internal i64 @__tds_base(i32 %pe) #0 {
  %i = add i32 %pe, 4
  %v = call i64 @__tds_word(i32 %i)
  ret i64 %v
}

; addr (on this PE's heap) -> the same byte on pe's heap
define internal i64 @__tds_peer(i64 %addr, i32 %pe) #0 {
  %me = call i32 @__tds_rank()
  %base_me = call i64 @__tds_base(i32 %me)
  %base_pe = call i64 @__tds_base(i32 %pe)
  %off = sub i64 %addr, %base_me
  %res = add i64 %off, %base_pe
  ret i64 %res
}

define internal i64 @__tds_globaltimer() #0 {
  %t = call i64 asm sideeffect "mov.u64 $0, %globaltimer;", "=l"()
  ret i64 %t
}

define internal void @__tds_fence_sys() #0 {
  call void asm sideeffect "fence.acq_rel.sys;", "~{memory}"()
  ret void
}

define internal i64 @__tds_ld_acquire(i64 %addr) #0 {
  %v = call i64 asm sideeffect "ld.acquire.sys.global.u64 $0, [$1];", "=l,l,~{memory}"(i64 %addr)
  ret i64 %v
}

; NVSHMEM_SIGNAL_SET (9) / NVSHMEM_SIGNAL_ADD (10) of value on the signal at (already translated) addr,
; release semantics at system scope. Any other op traps.
define internal void @__tds_signal_update(i64 %addr, i64 %value, i32 %op) #0 {
entry:
  switch i32 %op, label %bad [ i32 9, label %set
                               i32 10, label %add ]
set:
  %old_s = call i64 asm sideeffect "atom.release.sys.global.exch.b64 $0, [$1], $2;", "=l,l,l,~{memory}"(
      i64 %addr, i64 %value)
  ret void
add:
  %old_a = call i64 asm sideeffect "atom.release.sys.global.add.u64 $0, [$1], $2;", "=l,l,l,~{memory}"(
      i64 %addr, i64 %value)
  ret void
bad:
  call void @llvm.trap()
  unreachable
}

; unsigned 64-bit NVSHMEM comparison  seen <cmp> value  (cmp already checked to be in 0..5)
define internal i1 @__tds_cmp(i64 %seen, i32 %cmp, i64 %value) #0 {
entry:
  switch i32 %cmp, label %ge [ i32 0, label %eq
                               i32 1, label %ne
                               i32 2, label %gt
                               i32 3, label %le
                               i32 4, label %lt ]
eq:
  %r0 = icmp eq i64 %seen, %value
  ret i1 %r0
ne:
  %r1 = icmp ne i64 %seen, %value
  ret i1 %r1
gt:
  %r2 = icmp ugt i64 %seen, %value
  ret i1 %r2
le:
  %r3 = icmp ule i64 %seen, %value
  ret i1 %r3
lt:
  %r4 = icmp ult i64 %seen, %value
  ret i1 %r4
ge:
  %r5 = icmp uge i64 %seen, %value
  ret i1 %r5
}

; ---------------------------------------------------------------------------------------------------------------
; Copy: lane `lane` of `nlanes` copies its share of nbytes from src to dst (global addresses).

define internal void @__tds_copy(i64 %dst, i64 %src, i64 %nbytes, i32 %lane, i32 %nlanes) #1 {
entry:
  %or0 = or i64 %dst, %src
  %or1 = or i64 %or0, %nbytes
  %low = and i64 %or1, 15
  %aligned = icmp eq i64 %low, 0
  %lane64 = zext i32 %lane to i64
  %nlanes64 = zext i32 %nlanes to i64
  br i1 %aligned, label %vec.pre, label %byte.pre

  ; 16-byte vectors, lane-strided: four loads in flight before their four stores, then one at a time.
  ; (Loads are hoisted above stores by hand: NVSHMEM's copies, like memcpy, require dst and src not to overlap.)
vec.pre:
  %vi0 = shl i64 %lane64, 4
  %vstep = shl i64 %nlanes64, 4
  %vstep2 = shl i64 %nlanes64, 5
  %vstep3 = add i64 %vstep2, %vstep
  %vstep4 = shl i64 %nlanes64, 6
  br label %vec4.cond
vec4.cond:
  %qi = phi i64 [ %vi0, %vec.pre ], [ %qi.next, %vec4.body ]
  %qlast = add i64 %qi, %vstep3
  %qmore = icmp slt i64 %qlast, %nbytes
  br i1 %qmore, label %vec4.body, label %vec.cond
vec4.body:
  %qs0 = add i64 %src, %qi
  %qs1 = add i64 %qs0, %vstep
  %qs2 = add i64 %qs0, %vstep2
  %qs3 = add i64 %qs0, %vstep3
  %qd0 = add i64 %dst, %qi
  %qd1 = add i64 %qd0, %vstep
  %qd2 = add i64 %qd0, %vstep2
  %qd3 = add i64 %qd0, %vstep3
  %qsp0 = inttoptr i64 %qs0 to ptr addrspace(1)
  %qsp1 = inttoptr i64 %qs1 to ptr addrspace(1)
  %qsp2 = inttoptr i64 %qs2 to ptr addrspace(1)
  %qsp3 = inttoptr i64 %qs3 to ptr addrspace(1)
  %qdp0 = inttoptr i64 %qd0 to ptr addrspace(1)
  %qdp1 = inttoptr i64 %qd1 to ptr addrspace(1)
  %qdp2 = inttoptr i64 %qd2 to ptr addrspace(1)
  %qdp3 = inttoptr i64 %qd3 to ptr addrspace(1)
  %q0 = load <4 x i32>, ptr addrspace(1) %qsp0, align 16
  %q1 = load <4 x i32>, ptr addrspace(1) %qsp1, align 16
  %q2 = load <4 x i32>, ptr addrspace(1) %qsp2, align 16
  %q3 = load <4 x i32>, ptr addrspace(1) %qsp3, align 16
  store <4 x i32> %q0, ptr addrspace(1) %qdp0, align 16
  store <4 x i32> %q1, ptr addrspace(1) %qdp1, align 16
  store <4 x i32> %q2, ptr addrspace(1) %qdp2, align 16
  store <4 x i32> %q3, ptr addrspace(1) %qdp3, align 16
  %qi.next = add i64 %qi, %vstep4
  br label %vec4.cond
vec.cond:
  %vi = phi i64 [ %qi, %vec4.cond ], [ %vi.next, %vec.body ]
  %vmore = icmp slt i64 %vi, %nbytes
  br i1 %vmore, label %vec.body, label %done
vec.body:
  %vs = add i64 %src, %vi
  %vd = add i64 %dst, %vi
  %vsp = inttoptr i64 %vs to ptr addrspace(1)
  %vdp = inttoptr i64 %vd to ptr addrspace(1)
  %v = load <4 x i32>, ptr addrspace(1) %vsp, align 16
  store <4 x i32> %v, ptr addrspace(1) %vdp, align 16
  %vi.next = add i64 %vi, %vstep
  br label %vec.cond

  ; bytes, lane-strided
byte.pre:
  br label %byte.cond
byte.cond:
  %bi = phi i64 [ %lane64, %byte.pre ], [ %bi.next, %byte.body ]
  %bmore = icmp slt i64 %bi, %nbytes
  br i1 %bmore, label %byte.body, label %done
byte.body:
  %bs = add i64 %src, %bi
  %bd = add i64 %dst, %bi
  %bsp = inttoptr i64 %bs to ptr addrspace(1)
  %bdp = inttoptr i64 %bd to ptr addrspace(1)
  %b = load i8, ptr addrspace(1) %bsp, align 1
  store i8 %b, ptr addrspace(1) %bdp, align 1
  %bi.next = add i64 %bi, %nlanes64
  br label %byte.cond

done:
  ret void
}

; Lanes of the three granularities. Triton launches 1-D blocks, so tid.x / ntid.x cover the block.
define internal i32 @__tds_warp_lane() #0 {
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %l = and i32 %t, 31
  ret i32 %l
}

define internal void @__tds_put_block(i64 %dst, i64 %src, i64 %n, i32 %pe) #2 {
  %rdst = call i64 @__tds_peer(i64 %dst, i32 %pe)
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %nt = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  call void @__tds_copy(i64 %rdst, i64 %src, i64 %n, i32 %t, i32 %nt)
  ret void
}

define internal void @__tds_get_block(i64 %dst, i64 %src, i64 %n, i32 %pe) #2 {
  %rsrc = call i64 @__tds_peer(i64 %src, i32 %pe)
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %nt = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  call void @__tds_copy(i64 %dst, i64 %rsrc, i64 %n, i32 %t, i32 %nt)
  ret void
}

define internal void @__tds_put_warp(i64 %dst, i64 %src, i64 %n, i32 %pe) #2 {
  %rdst = call i64 @__tds_peer(i64 %dst, i32 %pe)
  %l = call i32 @__tds_warp_lane()
  call void @__tds_copy(i64 %rdst, i64 %src, i64 %n, i32 %l, i32 32)
  ret void
}

define internal void @__tds_get_warp(i64 %dst, i64 %src, i64 %n, i32 %pe) #2 {
  %rsrc = call i64 @__tds_peer(i64 %src, i32 %pe)
  %l = call i32 @__tds_warp_lane()
  call void @__tds_copy(i64 %dst, i64 %rsrc, i64 %n, i32 %l, i32 32)
  ret void
}

; ---------------------------------------------------------------------------------------------------------------
; putmem / getmem (thread, _warp, _block; the _nbi forms are the same functions)

define i32 @nvshmem_putmem(i64 %dst, i64 %src, i64 %n, i32 %pe) #0 {
  %rdst = call i64 @__tds_peer(i64 %dst, i32 %pe)
  call void @__tds_copy(i64 %rdst, i64 %src, i64 %n, i32 0, i32 1)
  ret i32 0
}

define i32 @nvshmem_putmem_nbi(i64 %dst, i64 %src, i64 %n, i32 %pe) #0 {
  %r = call i32 @nvshmem_putmem(i64 %dst, i64 %src, i64 %n, i32 %pe)
  ret i32 %r
}

define i32 @nvshmemx_putmem_warp(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  call void @__tds_put_warp(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @llvm.nvvm.bar.warp.sync(i32 -1)
  ret i32 0
}

define i32 @nvshmemx_putmem_nbi_warp(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  %r = call i32 @nvshmemx_putmem_warp(i64 %dst, i64 %src, i64 %n, i32 %pe)
  ret i32 %r
}

define i32 @nvshmemx_putmem_block(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  call void @__tds_put_block(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @llvm.nvvm.barrier0()
  ret i32 0
}

define i32 @nvshmemx_putmem_nbi_block(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  %r = call i32 @nvshmemx_putmem_block(i64 %dst, i64 %src, i64 %n, i32 %pe)
  ret i32 %r
}

define i32 @nvshmem_getmem(i64 %dst, i64 %src, i64 %n, i32 %pe) #0 {
  %rsrc = call i64 @__tds_peer(i64 %src, i32 %pe)
  call void @__tds_copy(i64 %dst, i64 %rsrc, i64 %n, i32 0, i32 1)
  ret i32 0
}

define i32 @nvshmem_getmem_nbi(i64 %dst, i64 %src, i64 %n, i32 %pe) #0 {
  %r = call i32 @nvshmem_getmem(i64 %dst, i64 %src, i64 %n, i32 %pe)
  ret i32 %r
}

define i32 @nvshmemx_getmem_warp(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  call void @__tds_get_warp(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @llvm.nvvm.bar.warp.sync(i32 -1)
  ret i32 0
}

define i32 @nvshmemx_getmem_nbi_warp(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  %r = call i32 @nvshmemx_getmem_warp(i64 %dst, i64 %src, i64 %n, i32 %pe)
  ret i32 %r
}

define i32 @nvshmemx_getmem_block(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  call void @__tds_get_block(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @llvm.nvvm.barrier0()
  ret i32 0
}

define i32 @nvshmemx_getmem_nbi_block(i64 %dst, i64 %src, i64 %n, i32 %pe) #3 {
  %r = call i32 @nvshmemx_getmem_block(i64 %dst, i64 %src, i64 %n, i32 %pe)
  ret i32 %r
}

; ---------------------------------------------------------------------------------------------------------------
; putmem_signal: copy; sync the participating threads; one thread: fence.acq_rel.sys + release signal update

define internal void @__tds_fence_and_signal(i64 %sig, i64 %value, i32 %op, i32 %pe) #0 {
  %rsig = call i64 @__tds_peer(i64 %sig, i32 %pe)
  call void @__tds_fence_sys()
  call void @__tds_signal_update(i64 %rsig, i64 %value, i32 %op)
  ret void
}

define i32 @nvshmem_putmem_signal(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe) #0 {
  %r = call i32 @nvshmem_putmem(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @__tds_fence_and_signal(i64 %sig, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

define i32 @nvshmem_putmem_signal_nbi(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe) #0 {
  %r = call i32 @nvshmem_putmem_signal(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe)
  ret i32 %r
}

define internal void @__tds_put_signal_warp(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op,
                                            i32 %pe) #2 {
entry:
  call void @__tds_put_warp(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @llvm.nvvm.bar.warp.sync(i32 -1)
  %l = call i32 @__tds_warp_lane()
  %first = icmp eq i32 %l, 0
  br i1 %first, label %signal, label %join
signal:
  call void @__tds_fence_and_signal(i64 %sig, i64 %value, i32 %op, i32 %pe)
  br label %join
join:
  call void @llvm.nvvm.bar.warp.sync(i32 -1)
  ret void
}

define i32 @nvshmemx_putmem_signal_warp(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe) #3 {
  call void @__tds_put_signal_warp(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

define i32 @nvshmemx_putmem_signal_nbi_warp(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op,
                                            i32 %pe) #3 {
  call void @__tds_put_signal_warp(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

define internal void @__tds_put_signal_block(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op,
                                             i32 %pe) #2 {
entry:
  call void @__tds_put_block(i64 %dst, i64 %src, i64 %n, i32 %pe)
  call void @llvm.nvvm.barrier0()
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %first = icmp eq i32 %t, 0
  br i1 %first, label %signal, label %join
signal:
  call void @__tds_fence_and_signal(i64 %sig, i64 %value, i32 %op, i32 %pe)
  br label %join
join:
  call void @llvm.nvvm.barrier0()
  ret void
}

define i32 @nvshmemx_putmem_signal_block(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe) #3 {
  call void @__tds_put_signal_block(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

define i32 @nvshmemx_putmem_signal_nbi_block(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op,
                                             i32 %pe) #3 {
  call void @__tds_put_signal_block(i64 %dst, i64 %src, i64 %n, i64 %sig, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

; ---------------------------------------------------------------------------------------------------------------
; Signals

; one thread: set/add the signal on pe (release, system scope)
define i32 @nvshmemx_signal_op(i64 %sig, i64 %value, i32 %op, i32 %pe) #0 {
  %rsig = call i64 @__tds_peer(i64 %sig, i32 %pe)
  call void @__tds_signal_update(i64 %rsig, i64 %value, i32 %op)
  ret i32 0
}

; every thread: poll the local signal (acquire, system scope) until  *sig <cmp> value; returns the value seen.
; Times out like dl.wait: after word [3] ns, __triton_dist_check_wait records the wait and traps.
define i64 @nvshmem_signal_wait_until(i64 %sig, i32 %cmp, i64 %value) #0 {
entry:
  %bad = icmp ugt i32 %cmp, 5
  br i1 %bad, label %trap, label %start
trap:
  call void @llvm.trap()
  unreachable
start:
  %timeout = call i64 @__tds_word(i32 3)
  %t0 = call i64 @__tds_globaltimer()
  br label %spin
spin:
  %seen = call i64 @__tds_ld_acquire(i64 %sig)
  %ok = call i1 @__tds_cmp(i64 %seen, i32 %cmp, i64 %value)
  br i1 %ok, label %done, label %clock
clock:
  %t1 = call i64 @__tds_globaltimer()
  %waited = sub i64 %t1, %t0
  %left = icmp ult i64 %waited, %timeout
  br i1 %left, label %spin, label %done
done:
  %timed_out = phi i32 [ 0, %spin ], [ 1, %clock ]
  %res = call i64 @__triton_dist_check_wait(i32 %timed_out, i64 %sig, i64 %value, i64 %seen)
  ret i64 %res
}

; every thread: order this thread's earlier memory operations before its later ones, system-wide (puts are
; complete on return, so quiet needs no more than fence)
define i32 @nvshmem_fence() #0 {
  call void @__tds_fence_sys()
  ret i32 0
}

define i32 @nvshmem_quiet() #0 {
  call void @__tds_fence_sys()
  ret i32 0
}

; ---------------------------------------------------------------------------------------------------------------
; PE queries

define i32 @nvshmem_my_pe() #0 {
  %r = call i32 @__tds_rank()
  ret i32 %r
}

define i32 @nvshmem_n_pes() #0 {
  %r = call i32 @__tds_npes()
  ret i32 %r
}

; ptr translated to pe; 0 for a pe outside [0, n_pes)
define i64 @nvshmem_ptr(i64 %ptr, i32 %pe) #0 {
  %n = call i32 @__tds_npes()
  %in = icmp ult i32 %pe, %n
  %addr = call i64 @__tds_peer(i64 %ptr, i32 %pe)
  %res = select i1 %in, i64 %addr, i64 0
  ret i64 %res
}

; ---------------------------------------------------------------------------------------------------------------
; barrier_all / sync_all over the heap slots (SHMEM_BARRIER_SLOTS = 0, SHMEM_BARRIER_COUNTER = 512 in
; triton_dist/runtime/heap.py). Run by one thread.

define internal void @__tds_barrier() #1 {
entry:
  call void @__tds_fence_sys()
  %me = call i32 @__tds_rank()
  %npes = call i32 @__tds_npes()
  %base_me = call i64 @__tds_base(i32 %me)
  %counter = add i64 %base_me, 512
  ; only this rank's kernels touch its counter: GPU scope is enough
  %old = call i64 asm sideeffect "atom.relaxed.gpu.global.add.u64 $0, [$1], 1;", "=l,l,~{memory}"(i64 %counter)
  %e = add i64 %old, 1
  %me64 = zext i32 %me to i64
  %my_slot_off = shl i64 %me64, 3
  br label %arrive.cond

  ; slot [me] of every PE := max(slot, e); relaxed, ordered after everything before by the fence above
arrive.cond:
  %pa = phi i32 [ 0, %entry ], [ %pa.next, %arrive.body ]
  %amore = icmp slt i32 %pa, %npes
  br i1 %amore, label %arrive.body, label %wait.pre
arrive.body:
  %base_pa = call i64 @__tds_base(i32 %pa)
  %slot_pa = add i64 %base_pa, %my_slot_off
  call void asm sideeffect "red.relaxed.sys.global.max.s64 [$0], $1;", "l,l,~{memory}"(i64 %slot_pa, i64 %e)
  %pa.next = add i32 %pa, 1
  br label %arrive.cond

  ; every slot of my heap >= e, acquire; one timeout for the whole wait, as dl.wait
wait.pre:
  %timeout = call i64 @__tds_word(i32 3)
  %t0 = call i64 @__tds_globaltimer()
  br label %wait.cond
wait.cond:
  %pw = phi i32 [ 0, %wait.pre ], [ %pw.next, %wait.checked ]
  %wmore = icmp slt i32 %pw, %npes
  br i1 %wmore, label %wait.slot, label %done
wait.slot:
  %pw64 = zext i32 %pw to i64
  %slot_off = shl i64 %pw64, 3
  %slot = add i64 %base_me, %slot_off
  br label %spin
spin:
  %seen = call i64 @__tds_ld_acquire(i64 %slot)
  %arrived = icmp sge i64 %seen, %e
  br i1 %arrived, label %wait.next, label %clock
clock:
  %t1 = call i64 @__tds_globaltimer()
  %waited = sub i64 %t1, %t0
  %left = icmp ult i64 %waited, %timeout
  br i1 %left, label %spin, label %wait.next
wait.next:
  %timed_out = phi i32 [ 0, %spin ], [ 1, %clock ]
  %chk = call i64 @__triton_dist_check_wait(i32 %timed_out, i64 %slot, i64 %e, i64 %seen)
  br label %wait.checked
wait.checked:
  %pw.next = add i32 %pw, 1
  br label %wait.cond

done:
  ret void
}

; thread variants: called by thread 0 between CTA barriers
define i32 @nvshmem_barrier_all() #0 {
  call void @__tds_barrier()
  ret i32 0
}

define i32 @nvshmem_sync_all() #0 {
  call void @__tds_barrier()
  ret i32 0
}

; _warp: called by warp 0
define internal void @__tds_barrier_warp() #2 {
entry:
  call void @llvm.nvvm.bar.warp.sync(i32 -1)
  %l = call i32 @__tds_warp_lane()
  %first = icmp eq i32 %l, 0
  br i1 %first, label %bar, label %join
bar:
  call void @__tds_barrier()
  br label %join
join:
  call void @llvm.nvvm.bar.warp.sync(i32 -1)
  ret void
}

define i32 @nvshmemx_barrier_all_warp() #3 {
  call void @__tds_barrier_warp()
  ret i32 0
}

define i32 @nvshmemx_sync_all_warp() #3 {
  call void @__tds_barrier_warp()
  ret i32 0
}

; _block: called by every thread
define internal void @__tds_barrier_block() #2 {
entry:
  call void @llvm.nvvm.barrier0()
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %first = icmp eq i32 %t, 0
  br i1 %first, label %bar, label %join
bar:
  call void @__tds_barrier()
  br label %join
join:
  call void @llvm.nvvm.barrier0()
  ret void
}

define i32 @nvshmemx_barrier_all_block() #3 {
  call void @__tds_barrier_block()
  ret i32 0
}

define i32 @nvshmemx_sync_all_block() #3 {
  call void @__tds_barrier_block()
  ret i32 0
}

; #0 small or public wrapper: always inlined     #1 loops: the optimiser decides
; #2 contains a warp/CTA barrier: convergent     #3 public wrapper around a barrier: inlined, convergent
attributes #0 = { alwaysinline nounwind }
attributes #1 = { nounwind }
attributes #2 = { convergent nounwind }
attributes #3 = { alwaysinline convergent nounwind }
