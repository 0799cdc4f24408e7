/*
 * airq.S: a bare-metal s390x guest that clears adapter indicators the way
 * Linux's virtio-ccw airq handler does, but by polling: under TCG nothing
 * outside QEMU can raise an adapter interrupt.
 *
 *   s390x-linux-gnu-as -m64 -march=z13 airq.S -o airq.o
 *   s390x-linux-gnu-ld -T airq.ld airq.o -o airq.elf
 *   qemu-system-s390x ... -smp 1,maxcpus=2 -kernel airq.elf
 *
 * The host describes the work in the parameter block at PARAM (0x2000); the
 * layout is documented, and encoded, in indicators/testing/guest/__init__.py.
 * Offsets below must match it (the Python side checks the version word).
 *
 * Areas that share one summary bit (several devices behind one summary,
 * as Linux's airq_info has them) come consecutively in the block, as a
 * group: the first area's A_GROUP says how many.  Each round, for every
 * group whose summary bit is set:
 *   1. scan the DSCI bits of every area of the group and atomically clear
 *      the set ones, counting one per cleared bit in that vector's u64
 *      counter;
 *   2. clear only the group's summary bit (CS loop on the aligned word);
 *   3. scan every area of the group once more (CS above serializes, so this
 *      is the barrier Linux spells smp_wmb).
 * A host that sets the DSCI bit before the summary can then never strand a
 * bit: if it set the summary after our clear in step 2, the next round scans;
 * if before, its DSCI bit was already visible to the rescan in step 3.  Had
 * step 2 followed the scan of one area only, a bit another area's host set
 * behind the already-set summary would be stranded.
 *
 * Clearing is a CSG on the aligned doubleword that holds the bits, never
 * NI/OI (interlocked only with the iacc2 facility) and never a plain store:
 * a bit is counted exactly when this CPU's CSG turned it from 1 to 0, so each
 * host set that found the bit clear is counted exactly once.
 *
 * After each round the guest bumps the heartbeat (rounds) and looks at the
 * control word, u64 (seq << 32 | command).  A new value is acknowledged by
 * copying it to ack: RUN continues, PARK spins (no scanning) until control
 * changes, STOP loads the quiesce wait PSW (QEMU then shuts down), FAULT
 * executes an invalid opcode (to test the program-check report), REBOOT
 * re-IPLs (diag 308 subcode 3).  A boot takes control as acknowledged.
 *
 * Driver mode (the host wrote the driver block at 0x3000, see
 * indicators/testing/driver.py): a boot counter there picks a slot per boot,
 * the areas move by the slot's offset (P_DELTA), the previous boot's slot is
 * counted (leftover bits), filled with PATTERN and checked at REBOOT, and one
 * registration record per area is published.
 */

        .set    PARAM,            0x2000
        .set    MAGIC_HI,         0x41495251      /* "AIRQ" */
        .set    MAGIC_LO,         0x52494731      /* "RIG1" */
        .set    VERSION,          2
        .set    MAX_AREAS,        32
        .set    MAX_KEYS,         64

        /* parameter block, written by the host before boot */
        .set    P_MAGIC,          0x000
        .set    P_VERSION,        0x008
        .set    P_NAREAS,         0x00c
        .set    P_NKEYS,          0x010
        .set    P_NCOUNTERS,      0x014
        .set    P_RESULTS,        0x018
        /* status, written by the guest */
        .set    P_STATE,          0x020
        .set    P_ERROR,          0x024
        .set    P_ROUNDS,         0x028
        /* handshake */
        .set    P_CONTROL,        0x030   /* host writes */
        .set    P_ACK,            0x038   /* guest writes */
        /* statistics, written by the guest */
        .set    P_SUMMARY_HITS,   0x040
        .set    P_CLEARED,        0x048
        .set    P_RESCAN_CLEARED, 0x050
        .set    P_SCRATCH,        0x058
        /* program-check report, written by the guest */
        .set    P_PGM_MARKER,     0x060
        .set    P_PGM_ILC,        0x064
        .set    P_PGM_CODE,       0x066
        .set    P_PGM_PSW,        0x068   /* mask, address */
        .set    P_PGM_TEID,       0x078
        .set    P_PGM_GPRS,       0x080   /* 16 x u64 */
        /* tables */
        .set    P_AREAS,          0x100
        .set    AREA_SIZE,        32
        .set    A_SUMMARY,        0x00    /* u64 gaddr of the summary byte */
        .set    A_DSCI,           0x08    /* u64 gaddr of the DSCI bit vector */
        .set    A_FIRST,          0x10    /* u32 first bit number, MSB-0 */
        .set    A_NVEC,           0x14    /* u32 number of vectors */
        .set    A_CBASE,          0x18    /* u32 index of vector 0's counter */
        .set    A_SMASK,          0x1c    /* u8 summary mask within its byte */
        .set    A_GROUP,          0x1d    /* u8 areas from here to the end of
                                             the group sharing this summary */
        .set    P_KEYS,           0x500
        .set    KEY_SIZE,         16
        .set    K_PAGE,           0x00    /* u64 gaddr inside the 4 KiB page */
        .set    K_KEY,            0x08    /* u8 ACC<<4 | F<<3 | R<<2 | C<<1 */
        .set    A_ISC,            0x1e    /* u8 the adapter's ISC (published only) */
        .set    P_GSAVE,          0xf00   /* guest-internal: scan_group's r10, r11, r14 */
        .set    P_BSAVE,          0xf18   /* guest-internal: driver_boot's r14 */
        .set    P_DELTA,          0xf20   /* guest-internal: this boot's slot offset */

        /* driver block: the guest registers like a driver (optional; on
         * when the host wrote DRV_MAGIC there before the first boot) */
        .set    DRIVER,           0x3000
        .set    DRV_MAGIC_HI,     0x41495251      /* "AIRQ" */
        .set    DRV_MAGIC_LO,     0x44525631      /* "DRV1" */
        .set    D_MAGIC,          0x000   /* host */
        .set    D_NSLOTS,         0x008   /* host: u32 slots (>= 2) */
        .set    D_BOOTS,          0x00c   /* guest: u32 boots so far, this one too */
        .set    D_SLOT_BASE,      0x010   /* host: u64 gaddr of slot 0 (the template's) */
        .set    D_SLOT_SIZE,      0x018   /* host: u64 bytes per slot */
        .set    D_PUBLISHED,      0x020   /* guest: u32 boot whose records are out */
        .set    D_STRAY,          0x028   /* guest: u64 stray bytes, all checks */
        .set    D_LAST_STRAY,     0x030   /* guest: u64 stray bytes, last check */
        .set    D_LEFTOVER,       0x038   /* guest: u64 bits counted at boot */
        .set    D_CHECKS,         0x040   /* guest: u64 checks done */
        .set    D_RECORDS,        0x100   /* guest: one record per area */
        .set    RECORD_SIZE,      32
        .set    R_SUMMARY,        0x00    /* u64 summary byte gaddr */
        .set    R_IND,            0x08    /* u64 indicator (DSCI) gaddr */
        .set    R_BIT,            0x10    /* u64 first indicator bit */
        .set    R_ISC,            0x18    /* u8 */
        .set    R_SMASK,          0x19    /* u8 summary mask */
        .set    R_CBASE,          0x1c    /* u32 counter of vector 0 */
        .set    PATTERN,          0xa5    /* fill of a previous boot's slot */

        .set    ST_RUNNING,       1
        .set    ST_PARKED,        2
        .set    ST_STOPPED,       3
        .set    ST_BAD_PARAMS,    4
        .set    ST_PROGRAM_CHECK, 5

        .set    CMD_RUN,          0
        .set    CMD_PARK,         1
        .set    CMD_STOP,         2
        .set    CMD_FAULT,        3
        .set    CMD_REBOOT,       4

        .set    ERR_MAGIC,        1
        .set    ERR_VERSION,      2
        .set    ERR_NAREAS,       3
        .set    ERR_NKEYS,        4
        .set    ERR_COUNTERS,     5       /* error = ERR_COUNTERS << 16 | area */
        .set    ERR_NVEC,         6       /* error = ERR_NVEC << 16 | area */
        .set    ERR_GROUP,        7       /* error = ERR_GROUP << 16 | area */

        /* lowcore */
        .set    LC_PGM_ILC,       0x08c
        .set    LC_PGM_CODE,      0x08e
        .set    LC_TEID,          0x0a8
        .set    LC_PGM_OLD_PSW,   0x150
        .set    LC_NEW_PSWS,      0x1a0   /* restart, ext, svc, pgm, mcck, io */
        .set    LC_SAVE,          0x200   /* program-check register save */

/* %r1 = slot offset of boot %r1 (u32): (boot mod slots) * slot size.
 * %r9: DRIVER; clobbers %r0. */
        .macro  SLOT_DELTA
        llgfr   %r1,%r1
        lghi    %r0,0
        dl      %r0,D_NSLOTS(%r9)       /* remainder in %r0 */
        lgr     %r1,%r0
        msg     %r1,D_SLOT_SIZE(%r9)
        .endm

        .text
        .globl  _start
_start:
        /* Every new PSW first, so that even a bad parameter block stops
         * visibly.  Entered with DAT off, key 0, 64-bit, disabled. */
        larl    %r1,new_psws
        mvc     LC_NEW_PSWS(96,%r0),0(%r1)

        lghi    %r13,PARAM
        /* validate the parameter block */
        l       %r1,P_MAGIC(%r13)
        clfi    %r1,MAGIC_HI
        jne     bad_magic
        l       %r1,P_MAGIC+4(%r13)
        clfi    %r1,MAGIC_LO
        jne     bad_magic
        clfhsi  P_VERSION(%r13),VERSION
        jne     bad_version
        clfhsi  P_NAREAS(%r13),MAX_AREAS
        jh      bad_nareas
        clfhsi  P_NKEYS(%r13),MAX_KEYS
        jh      bad_nkeys
        llgf    %r10,P_NAREAS(%r13)
        la      %r11,P_AREAS(%r13)
        lghi    %r2,0                   /* area index */
        ltgr    %r10,%r10
        jz      2f
1:      llgf    %r3,A_NVEC(%r11)
        ltgr    %r3,%r3
        jz      bad_nvec
        llgf    %r4,A_CBASE(%r11)
        algr    %r4,%r3
        llgf    %r5,P_NCOUNTERS(%r13)
        clgr    %r4,%r5
        jh      bad_counters
        llgc    %r4,A_GROUP(%r11)       /* 1 <= group <= areas left (this one too) */
        ltgr    %r4,%r4
        jz      bad_group
        clgr    %r4,%r10
        jh      bad_group
        la      %r11,AREA_SIZE(%r11)
        aghi    %r2,1
        brctg   %r10,1b
2:
        /* storage keys: SSKE on each listed page */
        llgf    %r10,P_NKEYS(%r13)
        la      %r11,P_KEYS(%r13)
        ltgr    %r10,%r10
        jz      4f
3:      lg      %r2,K_PAGE(%r11)
        llgc    %r1,K_KEY(%r11)
        sske    %r1,%r2
        la      %r11,KEY_SIZE(%r11)
        brctg   %r10,3b
4:
        lg      %r12,P_RESULTS(%r13)
        /* RAM survives a reset: the command before a reboot is done */
        mvc     P_ACK(8,%r13),P_CONTROL(%r13)
        xc      P_DELTA(8,%r13),P_DELTA(%r13)
        brasl   %r14,driver_boot
        mvhi    P_STATE(%r13),ST_RUNNING

/* ------------------------------------------------------------ main loop */
round:
        llgf    %r10,P_NAREAS(%r13)
        la      %r11,P_AREAS(%r13)
        ltgr    %r10,%r10
        jz      round_end
area:   /* %r11: the first area of a group, %r10: areas left */
        lg      %r1,A_SUMMARY(%r11)
        ag      %r1,P_DELTA(%r13)
        llc     %r2,0(%r1)
        llc     %r3,A_SMASK(%r11)
        nr      %r2,%r3
        jz      next_group
        agsi    P_SUMMARY_HITS(%r13),1

        brasl   %r14,scan_group         /* 1. scan with the summary set */

        /* 2. clear the group's summary bit, and only it */
        lg      %r1,A_SUMMARY(%r11)
        ag      %r1,P_DELTA(%r13)
        lghi    %r2,3
        ngr     %r2,%r1                 /* byte index in its word */
        nill    %r1,0xfffc              /* the aligned word */
        llc     %r3,A_SMASK(%r11)
        lghi    %r4,3
        sgr     %r4,%r2
        sllg    %r4,%r4,3               /* (3 - index) * 8 */
        sll     %r3,0(%r4)              /* the mask in the word */
        xilf    %r3,0xffffffff          /* ... inverted */
        l       %r5,0(%r1)
5:      lr      %r6,%r5
        nr      %r6,%r3
        cs      %r5,%r6,0(%r1)
        jl      5b

        /* 3. rescan: CS above serialized, the summary clear is visible */
        mvc     P_SCRATCH(8,%r13),P_CLEARED(%r13)
        brasl   %r14,scan_group
        lg      %r1,P_CLEARED(%r13)
        sg      %r1,P_SCRATCH(%r13)
        ag      %r1,P_RESCAN_CLEARED(%r13)
        stg     %r1,P_RESCAN_CLEARED(%r13)
next_group:
        llgc    %r1,A_GROUP(%r11)       /* validated: 1..areas left */
        sgr     %r10,%r1
        sllg    %r1,%r1,5               /* * AREA_SIZE */
        agr     %r11,%r1
        ltgr    %r10,%r10
        jh      area
round_end:
        agsi    P_ROUNDS(%r13),1
        lg      %r1,P_CONTROL(%r13)
        cg      %r1,P_ACK(%r13)
        je      round

/* A new control word in %r1: act on it, acknowledge it. */
control:
        lr      %r2,%r1                 /* command = low word */
        chi     %r2,CMD_PARK
        je      park
        chi     %r2,CMD_STOP
        je      stop
        chi     %r2,CMD_FAULT
        je      fault
        chi     %r2,CMD_REBOOT
        je      reboot
        /* RUN, and unknown commands, mean run */
        mvhi    P_STATE(%r13),ST_RUNNING
        stg     %r1,P_ACK(%r13)
        j       round

park:   mvhi    P_STATE(%r13),ST_PARKED
        stg     %r1,P_ACK(%r13)         /* counters were stored before */
6:      lg      %r2,P_CONTROL(%r13)
        cgr     %r2,%r1
        je      6b
        lgr     %r1,%r2
        j       control

stop:   mvhi    P_STATE(%r13),ST_STOPPED
        stg     %r1,P_ACK(%r13)
        larl    %r1,quiesce_psw
        lpswe   0(%r1)

fault:  stg     %r1,P_ACK(%r13)
        .globl  fault_insn
fault_insn:
        .word   0x0000                  /* invalid opcode: operation exception */
        j       round

/* ---------------------------------------------------------------- reboot
 * Check the previous boot's slot (filled with PATTERN at this boot's start;
 * nobody may write it now), then re-IPL: diag 308 subcode 3.  QEMU makes
 * that a guest reset request (SHUTDOWN "guest-reset" when its reboot action
 * is shutdown) and, with -kernel, reloads only the ELF segment.
 */
reboot: stg     %r1,P_ACK(%r13)
        lghi    %r9,DRIVER
        brasl   %r14,driver_on
        jne     14f
        l       %r1,D_BOOTS(%r9)
        chi     %r1,1
        je      14f                     /* no previous slot yet */
        ahi     %r1,-1
        SLOT_DELTA
        lg      %r2,D_SLOT_BASE(%r9)
        agr     %r2,%r1
        lg      %r3,D_SLOT_SIZE(%r9)
        lghi    %r4,0
12:     cli     0(%r2),PATTERN
        je      13f
        aghi    %r4,1
13:     la      %r2,1(%r2)
        brctg   %r3,12b
        stg     %r4,D_LAST_STRAY(%r9)
        ag      %r4,D_STRAY(%r9)
        stg     %r4,D_STRAY(%r9)
        agsi    D_CHECKS(%r9),1
14:     lghi    %r3,3                   /* subcode 3: load clear (re-IPL) */
        diag    %r1,%r3,0x308
        j       round                   /* not reached */

/* ------------------------------------------------------------ driver_on
 * CC 0 when the host asked for driver mode (%r9: DRIVER); clobbers %r1. */
driver_on:
        larl    %r1,drv_magic
        clc     D_MAGIC(8,%r9),0(%r1)
        br      %r14

/* ---------------------------------------------------------- driver_boot
 * Driver mode, at every boot: count the boots, count the bits the previous
 * boot left set in its slot (its counters go on), fill that slot with
 * PATTERN, zero this boot's slot (boot number mod slots) and publish one
 * registration record per area at its new addresses; D_PUBLISHED last.
 */
driver_boot:
        stg     %r14,P_BSAVE(%r13)
        lghi    %r9,DRIVER
        brasl   %r14,driver_on
        jne     db_done
        l       %r1,D_BOOTS(%r9)
        ahi     %r1,1
        st      %r1,D_BOOTS(%r9)
        chi     %r1,1
        je      db_fresh
        ahi     %r1,-1
        SLOT_DELTA
        stg     %r1,P_DELTA(%r13)
        mvc     P_SCRATCH(8,%r13),P_CLEARED(%r13)
        llgf    %r10,P_NAREAS(%r13)
        la      %r11,P_AREAS(%r13)
        ltgr    %r10,%r10
        jz      16f
15:     brasl   %r14,scan
        la      %r11,AREA_SIZE(%r11)
        brctg   %r10,15b
16:     lghi    %r9,DRIVER              /* scan clobbered it */
        lg      %r1,P_CLEARED(%r13)
        sg      %r1,P_SCRATCH(%r13)
        ag      %r1,D_LEFTOVER(%r9)
        stg     %r1,D_LEFTOVER(%r9)
        lg      %r2,D_SLOT_BASE(%r9)
        ag      %r2,P_DELTA(%r13)
        lg      %r3,D_SLOT_SIZE(%r9)
        lghi    %r4,0
        lghi    %r5,0
17:     mvcle   %r2,%r4,PATTERN
        jo      17b
db_fresh:
        l       %r1,D_BOOTS(%r9)
        SLOT_DELTA
        stg     %r1,P_DELTA(%r13)
        lg      %r2,D_SLOT_BASE(%r9)
        agr     %r2,%r1
        lg      %r3,D_SLOT_SIZE(%r9)
        lghi    %r4,0
        lghi    %r5,0
18:     mvcle   %r2,%r4,0
        jo      18b
        llgf    %r10,P_NAREAS(%r13)
        la      %r11,P_AREAS(%r13)
        la      %r8,D_RECORDS(%r9)
        ltgr    %r10,%r10
        jz      20f
19:     lg      %r1,A_SUMMARY(%r11)
        ag      %r1,P_DELTA(%r13)
        stg     %r1,R_SUMMARY(%r8)
        lg      %r1,A_DSCI(%r11)
        ag      %r1,P_DELTA(%r13)
        stg     %r1,R_IND(%r8)
        llgf    %r1,A_FIRST(%r11)
        stg     %r1,R_BIT(%r8)
        mvc     R_ISC(1,%r8),A_ISC(%r11)
        mvc     R_SMASK(1,%r8),A_SMASK(%r11)
        mvc     R_CBASE(4,%r8),A_CBASE(%r11)
        la      %r8,RECORD_SIZE(%r8)
        la      %r11,AREA_SIZE(%r11)
        brctg   %r10,19b
20:     mvc     D_PUBLISHED(4,%r9),D_BOOTS(%r9)
db_done:
        lg      %r14,P_BSAVE(%r13)
        br      %r14

/* ----------------------------------------------------------- scan_group
 * Scan every area of the group starting at %r11 (A_GROUP areas).  Clobbers
 * what scan clobbers; keeps %r10, %r11 and %r14 (saved in the block: there
 * is no stack).
 */
scan_group:
        stmg    %r10,%r11,P_GSAVE(%r13)
        stg     %r14,P_GSAVE+16(%r13)
        llgc    %r10,A_GROUP(%r11)
11:     brasl   %r14,scan
        la      %r11,AREA_SIZE(%r11)
        brctg   %r10,11b
        lmg     %r10,%r11,P_GSAVE(%r13)
        lg      %r14,P_GSAVE+16(%r13)
        br      %r14

/* ----------------------------------------------------------------- scan
 * Test-and-clear every set DSCI bit of the area at %r11 and count each in
 * the vector's counter at %r12.  Works a doubleword at a time: M masks this
 * area's bits in the doubleword, a CSG clears (old & M), and FLOGR walks the
 * bits it cleared.  Clobbers %r0-%r9 and %r15; returns to %r14.
 */
scan:
        llgf    %r2,A_FIRST(%r11)       /* b, the next bit number */
        llgf    %r3,A_NVEC(%r11)
        algr    %r3,%r2                 /* end */
        lg      %r4,A_DSCI(%r11)
        ag      %r4,P_DELTA(%r13)
        sllg    %r4,%r4,3               /* DSCI as a bit address */
scan_dw:
        clgr    %r2,%r3
        jhe     scan_done
        lgr     %r5,%r4
        algr    %r5,%r2                 /* g = bit address of b */
        lghi    %r6,63
        ngr     %r6,%r5                 /* k0 = g % 64, b's bit in its dw */
        srlg    %r5,%r5,6
        sllg    %r5,%r5,3               /* A, the doubleword */
        lghi    %r7,64
        sgr     %r7,%r6                 /* 64 - k0 */
        lgr     %r8,%r3
        sgr     %r8,%r2                 /* end - b */
        clgr    %r7,%r8
        jle     7f
        lgr     %r7,%r8
7:      /* cnt = min(64 - k0, end - b) in 1..64.  A register shift uses
         * only 6 bits, so build M = (~0 << (64 - cnt)) >> k0, never >> 64. */
        lghi    %r8,64
        sgr     %r8,%r7
        lghi    %r0,-1
        sllg    %r0,%r0,0(%r8)
        srlg    %r0,%r0,0(%r6)          /* M */
        lg      %r1,0(%r5)
8:      lgr     %r8,%r1
        ngr     %r8,%r0                 /* our set bits */
        jz      scan_next
        xgr     %r8,%r1                 /* old & ~M */
        csg     %r1,%r8,0(%r5)
        jl      8b                      /* %r1 reloaded: try again */
        ngr     %r1,%r0                 /* the bits this CSG cleared */
        llgf    %r7,A_CBASE(%r11)
        algr    %r7,%r2
        llgf    %r8,A_FIRST(%r11)
        sgr     %r7,%r8
        sgr     %r7,%r6                 /* counter index of bit 0 of A */
9:      flogr   %r8,%r1                 /* %r8 = bit, %r9 = rest */
        lgr     %r1,%r9
        lgr     %r15,%r7
        agr     %r15,%r8
        sllg    %r15,%r15,3
        agr     %r15,%r12
        agsi    0(%r15),1
        agsi    P_CLEARED(%r13),1
        ltgr    %r1,%r1
        jnz     9b
scan_next:
        aghi    %r2,64
        sgr     %r2,%r6                 /* b += 64 - k0 (past end: done) */
        j       scan_dw
scan_done:
        br      %r14

/* ------------------------------------------------------ bad parameters */
bad_magic:
        llilh   %r1,ERR_MAGIC
        j       bad
bad_version:
        llilh   %r1,ERR_VERSION
        j       bad
bad_nareas:
        llilh   %r1,ERR_NAREAS
        j       bad
bad_nkeys:
        llilh   %r1,ERR_NKEYS
        j       bad
bad_nvec:
        llilh   %r1,ERR_NVEC
        j       bad_area
bad_group:
        llilh   %r1,ERR_GROUP
        j       bad_area
bad_counters:
        llilh   %r1,ERR_COUNTERS
bad_area:
        or      %r1,%r2                 /* error = reason << 16 | area */
bad:    st      %r1,P_ERROR(%r13)
        mvhi    P_STATE(%r13),ST_BAD_PARAMS
        larl    %r1,bad_params_psw
        lpswe   0(%r1)

/* --------------------------------------------------------- program check
 * Save the registers, copy the interruption into the parameter block and
 * stop in a disabled wait.  A program check in here goes straight to the
 * wait (the marker is already set), never around again.
 */
        .globl  pgm_handler
pgm_handler:
        stmg    %r0,%r15,LC_SAVE
        lghi    %r13,PARAM
        clfhsi  P_PGM_MARKER(%r13),0
        jne     10f
        mvhi    P_PGM_MARKER(%r13),0x5047       /* "PG" */
        mvc     P_PGM_ILC(2,%r13),LC_PGM_ILC(%r0)
        mvc     P_PGM_CODE(2,%r13),LC_PGM_CODE(%r0)
        mvc     P_PGM_PSW(16,%r13),LC_PGM_OLD_PSW(%r0)
        mvc     P_PGM_TEID(8,%r13),LC_TEID(%r0)
        mvc     P_PGM_GPRS(128,%r13),LC_SAVE(%r0)
        mvhi    P_STATE(%r13),ST_PROGRAM_CHECK
10:     larl    %r1,pgm_wait_psw
        lpswe   0(%r1)

/* ------------------------------------------------------------------ PSWs
 * Disabled wait: mask 0x0002000180000000 (wait, 64-bit).  The address is a
 * code: 0xdead0 followed by the lowcore offset of the new PSW that fired.
 * 0xfff is QEMU's "quiesce" code: a guest shutdown, not a panic.
 */
        .section .rodata
        .balign 16
new_psws:
        .quad   0x0002000180000000, 0xdead01a0  /* restart (QMP inject-nmi) */
        .quad   0x0002000180000000, 0xdead01b0  /* external */
        .quad   0x0002000180000000, 0xdead01c0  /* supervisor call */
        .quad   0x0000000180000000, pgm_handler /* program check */
        .quad   0x0002000180000000, 0xdead01e0  /* machine check */
        .quad   0x0002000180000000, 0xdead01f0  /* I/O */
pgm_wait_psw:
        .quad   0x0002000180000000, 0xdead01d0
bad_params_psw:
        .quad   0x0002000180000000, 0xdead0ba0
quiesce_psw:
        .quad   0x0002000180000000, 0x00000fff
drv_magic:
        .long   DRV_MAGIC_HI, DRV_MAGIC_LO
