; =====================================================================================
;  morph86 demo guest: a tour of what a PC's CPU does from reset to paging.
;
;  This file is the whole "firmware" of the built-in demo. morph86 maps it like a BIOS
;  ROM: the 64 KiB image sits at the top of the 4 GiB address space (0xFFFF0000) and a
;  copy of it is visible just below 1 MiB (0xF0000), as a PC chipset arranges.
;  Assemble with:  nasm -f bin -o demo.bin demo.asm   (roms/build.sh does that)
;
;  The stops of the tour:
;    1. reset: the CPU wakes in 16-bit real mode at F000:FFF0, 16 bytes below 4 GiB
;    2. real mode: segment * 16 + offset addressing; the serial port and the text screen
;    3. protected mode: a GDT, CR0.PE, a far jump that loads a 32-bit code segment
;    4. interrupts: an IDT, the 8259 PIC remapped, the 8254 timer at 100 Hz, the keyboard
;    5. paging: a page directory and a page table, CR3, CR4.PSE, CR0.PG, and an alias
;       mapping that shows the same physical page at two virtual addresses
;    6. graphics: the Bochs VBE "dispi" registers, the linear framebuffer found through
;       PCI configuration space, an animation, and the keys you type echoed in pixels
;    7. the end: without a display the demo resets the machine after a few seconds
;       (morph86 treats that reset as "done" for the demo and exits with status 0)
;
;  There is no BIOS here. What a PC's VGA BIOS would have done before us (put the card
;  in 80x25 text mode and load a font into plane 2), morph86's VGA does at power-on.
; =====================================================================================

ROMBASE     equ 0xF0000          ; where the ROM copy below 1 MiB starts (linear)
%define LIN(x) (ROMBASE + (x))   ; linear address of a label (the image is assembled at 0)

COM1        equ 0x3F8            ; 16550 UART, first serial port
TEXT        equ 0xB8000          ; colour text screen: 2 bytes (char, attribute) per cell
PAGE_DIR    equ 0x10000          ; RAM we use: page directory (4 KiB, 4 KiB aligned)
PAGE_TABLE  equ 0x11000          ;   one page table: maps the first 4 MiB
IDT         equ 0x12000          ;   interrupt descriptor table (256 gates x 8 bytes)
FONT        equ 0x20000          ;   copy of the VGA font (256 glyphs x 16 rows)
VARS        equ 0x30000          ;   our variables
STACK_TOP   equ 0x80000

TICKS       equ VARS + 0         ; timer interrupts since they were enabled (100 Hz)
KEY_HEAD    equ VARS + 4         ; keyboard ring buffer: written by IRQ1...
KEY_TAIL    equ VARS + 8         ; ...read by the main loop
LFB         equ VARS + 12        ; linear framebuffer address (0 = no VBE)
BOX_X       equ VARS + 16
BOX_Y       equ VARS + 20
BOX_DX      equ VARS + 24
BOX_DY      equ VARS + 28
CURSOR_X    equ VARS + 32        ; where the next echoed key is drawn
LAST_TICK   equ VARS + 36
KEY_RING    equ VARS + 64        ; 64 bytes

SCR_W       equ 640
SCR_H       equ 480

        bits 16
        org 0

; -------------------------------------------------------------------------------------
; 2. Real mode. We arrive here from the reset vector at the end of the image. CS is
;    0xF000, so CS:IP = F000:xxxx means linear 0xF0000 + xxxx: every address is a
;    16-bit segment shifted left by 4 plus a 16-bit offset, the 8086's way to reach
;    1 MiB with 16-bit registers.
; -------------------------------------------------------------------------------------
start16:
        cli                             ; no interrupts until we have somewhere to send them
        cld                             ; string instructions count upwards
        xor ax, ax
        mov ss, ax
        mov sp, 0x7000                  ; a stack in low RAM: SS:SP = 0000:7000
        push cs
        pop ds                          ; DS = CS, so our strings are at DS:offset

        ; The serial port: divisor latch on (LCR bit 7), divisor 1 = 115200 baud,
        ; then 8 data bits, no parity, 1 stop bit (LCR = 3) and the FIFOs on.
        mov dx, COM1 + 3
        mov al, 0x80
        out dx, al
        mov dx, COM1 + 0
        mov al, 1
        out dx, al
        mov dx, COM1 + 1
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x03
        out dx, al
        mov dx, COM1 + 2
        mov al, 0xC7
        out dx, al

        mov si, msg_reset
        call serial_puts16

        ; The text screen in real mode: segment 0xB800 * 16 = 0xB8000.
        mov ax, 0xB800
        mov es, ax
        xor di, di
        mov si, banner
        mov ah, 0x1F                    ; attribute: white (F) on blue (1)
.banner:
        lodsb
        test al, al
        jz .banner_done
        stosw                           ; ES:DI <- AX: character and attribute
        jmp .banner
.banner_done:
        mov cx, 80 - (banner_end - banner - 1)
        mov al, ' '
        rep stosw                       ; the rest of the title line, same colours

        ; The hardware cursor is drawn by the CRT controller (index port 0x3D4, data
        ; 0x3D5): register 0x0A is "cursor start", and its bit 5 switches the cursor off.
        mov dx, 0x3D4
        mov ax, 0x200A                  ; OUT of a word: index 0x0A to 0x3D4, 0x20 to 0x3D5
        out dx, ax

        ; The A20 gate: on the original PC, addresses wrapped at 1 MiB; the AT added a
        ; gate on address line 20. "Fast A20" is bit 1 of system control port 0x92.
        in al, 0x92
        or al, 0x02
        and al, 0xFE                    ; bit 0 would reset the machine
        out 0x92, al

; -------------------------------------------------------------------------------------
; 3. Protected mode. Segments become selectors: indexes into the Global Descriptor
;    Table, whose entries hold a base, a limit and access rights. Ours are "flat": base
;    0, limit 4 GiB, so linear address = offset. Setting CR0.PE switches the meaning of
;    segment loads; the far jump then loads CS with a 32-bit code segment.
; -------------------------------------------------------------------------------------
        lgdt [cs:gdt_ptr]
        mov eax, cr0
        or eax, 1                       ; CR0.PE
        mov cr0, eax
        jmp dword 0x08:LIN(pm_entry)    ; selector 0x08 = GDT entry 1, the code segment

serial_puts16:                          ; DS:SI -> zero-terminated string
        lodsb
        test al, al
        jz .done
        mov ah, al
        mov dx, COM1 + 5
.wait:  in al, dx                       ; line status: bit 5 = transmitter empty
        test al, 0x20
        jz .wait
        mov al, ah
        mov dx, COM1
        out dx, al
        jmp serial_puts16
.done:  ret

        align 8
gdt:    dq 0                            ; entry 0: the null descriptor, never used
        dq 0x00CF9A000000FFFF           ; 0x08: code, base 0, limit 4 GiB (G=1), 32-bit, ring 0
        dq 0x00CF92000000FFFF           ; 0x10: data, base 0, limit 4 GiB, writable
gdt_end:
gdt_ptr:
        dw gdt_end - gdt - 1            ; limit
        dd LIN(gdt)                     ; linear base

idt_ptr:
        dw 256 * 8 - 1
        dd IDT

msg_reset:  db "morph86 demo: reset vector F000:FFF0, real mode", 13, 10, 0
banner:     db " morph86 demo guest: reset -> real mode -> protected mode -> paging -> VBE", 0
banner_end:

; The frontend finds this block and sets the byte after the signature to 1 when the
; machine has no display: then the demo ends by itself.
cfg_signature:  db "M86DEMO!"
cfg_headless:   db 0

; =====================================================================================
        bits 32
pm_entry:
        mov ax, 0x10                    ; every data segment register: the flat data segment
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, STACK_TOP

        mov esi, LIN(msg_pm)
        call serial_puts
        mov esi, LIN(txt_pm)
        mov edi, TEXT + 2 * 160
        mov ah, 0x0A                    ; light green on black
        call text_puts

        ; Zero our variables.
        mov edi, VARS
        xor eax, eax
        mov ecx, 32
        rep stosd

; -------------------------------------------------------------------------------------
; 4. Interrupts. The IDT holds one 8-byte gate per vector: handler address and the code
;    selector. Vectors 0-31 are the CPU's exceptions. The 8259 PIC would put IRQ0-7 on
;    vectors 8-15, right on top of them, so we move ("remap") it to 0x20-0x2F.
; -------------------------------------------------------------------------------------
        mov edi, IDT
        mov ecx, 256
        mov ebx, LIN(isr_unexpected)
.fill:  call set_gate
        add edi, 8
        loop .fill
        mov edi, IDT + 0x20 * 8
        mov ebx, LIN(isr_timer)
        call set_gate
        mov edi, IDT + 0x21 * 8
        mov ebx, LIN(isr_keyboard)
        call set_gate
        mov ecx, 14                     ; IRQ2-15: acknowledge and ignore
        mov edi, IDT + 0x22 * 8
        mov ebx, LIN(isr_other_irq)
.irqs:  call set_gate
        add edi, 8
        loop .irqs
        lidt [LIN(idt_ptr)]

        ; PIC initialisation words: ICW1 (edge, cascade, ICW4 follows), ICW2 (vector
        ; base), ICW3 (the slave hangs on IRQ2), ICW4 (8086 mode).
        mov al, 0x11
        out 0x20, al
        out 0xA0, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x28
        out 0xA1, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x02
        out 0xA1, al
        mov al, 0x01
        out 0x21, al
        out 0xA1, al
        mov al, 0xFC                    ; unmask IRQ0 (timer) and IRQ1 (keyboard) only
        out 0x21, al
        mov al, 0xFF
        out 0xA1, al

        ; The 8254 timer: channel 0, lobyte/hibyte, mode 2 (rate generator), divisor
        ; 11932: 1193182 Hz / 11932 = 100 Hz.
        mov al, 0x34
        out 0x43, al
        mov ax, 11932
        out 0x40, al
        mov al, ah
        out 0x40, al

        mov esi, LIN(txt_irq)
        mov edi, TEXT + 3 * 160
        mov ah, 0x0E
        call text_puts

; -------------------------------------------------------------------------------------
; 5. Paging. Linear addresses now go through a two-level table: the top 10 bits pick a
;    page directory entry, the next 10 a page table entry, the low 12 the byte in the
;    4 KiB page. We map the first 4 MiB to themselves ("identity", so the code keeps
;    running where it is), the same 4 MiB again at 0xC0000000, and later the
;    framebuffer with 4 MiB pages (CR4.PSE).
; -------------------------------------------------------------------------------------
        mov edi, PAGE_DIR
        xor eax, eax
        mov ecx, 1024
        rep stosd                       ; every entry "not present"
        mov edi, PAGE_TABLE
        mov eax, 0x003                  ; physical 0, present (bit 0) + writable (bit 1)
        mov ecx, 1024
.pte:   stosd
        add eax, 0x1000
        loop .pte
        mov dword [PAGE_DIR + 0 * 4], PAGE_TABLE | 3            ; 0x00000000-0x003FFFFF
        mov dword [PAGE_DIR + (0xC0000000 >> 22) * 4], PAGE_TABLE | 3  ; alias at 3 GiB

        call find_lfb                   ; EAX = framebuffer physical address or 0
        mov [LFB], eax
        test eax, eax
        jz .no_lfb
        and eax, 0xFFC00000             ; 4 MiB pages: PS (bit 7) + writable + present
        or eax, 0x83
        mov edi, [LFB]
        shr edi, 22
        lea edi, [PAGE_DIR + edi * 4]
        mov ecx, 4                      ; 16 MiB of framebuffer
.lfbmap:
        mov [edi], eax
        add eax, 0x400000
        add edi, 4
        loop .lfbmap
.no_lfb:
        mov eax, cr4
        or eax, 0x10                    ; CR4.PSE: allow 4 MiB pages
        mov cr4, eax
        mov eax, PAGE_DIR
        mov cr3, eax                    ; where the page directory is
        mov eax, cr0
        or eax, 0x80000000              ; CR0.PG: paging on
        mov cr0, eax

        ; Proof: write a line through the alias. Virtual 0xC00B8000 and 0x000B8000 are
        ; the same physical page, the text screen.
        mov esi, LIN(txt_paging)
        mov edi, 0xC0000000 + TEXT + 4 * 160
        mov ah, 0x0B
        call text_puts
        mov esi, LIN(msg_paging)
        call serial_puts

        mov esi, LIN(txt_keys)
        mov edi, TEXT + 6 * 160
        mov ah, 0x07
        call text_puts

        sti                             ; interrupts on: the timer starts ticking

        ; Text phase: 1.5 seconds, echoing keys on the text screen.
        mov dword [CURSOR_X], 0
.text_phase:
        hlt                             ; sleep until an interrupt
        call take_key
        jz .no_text_key
        call echo_serial
        movzx ecx, byte [CURSOR_X]
        cmp ecx, 79
        jae .no_text_key
        mov ah, 0x0F
        mov [TEXT + 7 * 160 + ecx * 2], ax
        inc dword [CURSOR_X]
.no_text_key:
        cmp dword [TICKS], 150
        jb .text_phase

; -------------------------------------------------------------------------------------
; 6. Graphics. First we borrow the VGA's font: in text mode it lives in plane 2 of video
;    memory, 32 bytes per character. Switching the sequencer and graphics controller to
;    planar access makes plane 2 readable at 0xA0000.
; -------------------------------------------------------------------------------------
        cmp dword [LFB], 0
        je .graphics_done
        mov dx, 0x3C4
        mov ax, 0x0402                  ; SR2 map mask: plane 2
        out dx, ax
        mov ax, 0x0704                  ; SR4: planar (odd/even off), extended memory
        out dx, ax
        mov dx, 0x3CE
        mov ax, 0x0204                  ; GR4: read plane 2
        out dx, ax
        mov ax, 0x0005                  ; GR5: read mode 0, write mode 0
        out dx, ax
        mov ax, 0x0406                  ; GR6: map 0xA0000-0xAFFFF, no odd/even
        out dx, ax
        mov esi, 0xA0000
        mov edi, FONT
        mov ecx, 256
.glyph: push ecx
        mov ecx, 16
        rep movsb
        add esi, 16                     ; 32 bytes per glyph in plane 2, 16 used
        pop ecx
        loop .glyph

        ; The Bochs VBE "dispi" interface: an index at port 0x1CE, data at 0x1CF.
        mov ax, 4                       ; ENABLE = 0 while changing the mode
        xor bx, bx
        call dispi_write
        mov ax, 1                       ; XRES
        mov bx, SCR_W
        call dispi_write
        mov ax, 2                       ; YRES
        mov bx, SCR_H
        call dispi_write
        mov ax, 3                       ; BPP
        mov bx, 32
        call dispi_write
        mov ax, 4                       ; ENABLE: enabled (bit 0) + linear framebuffer (bit 6)
        mov bx, 0x41
        call dispi_write

        mov esi, LIN(msg_vbe)
        call serial_puts
        mov esi, LIN(gfx_title)
        mov ebx, 16
        mov ecx, 16
        mov edx, 0x00FFFF80
        call draw_string
        mov esi, LIN(gfx_keys)
        mov ebx, 16
        mov ecx, 400
        mov edx, 0x00C0C0C0
        call draw_string
        mov dword [CURSOR_X], 16
        mov dword [BOX_X], 100
        mov dword [BOX_Y], 100
        mov dword [BOX_DX], 4
        mov dword [BOX_DY], 3

.frame: hlt
        call take_key
        jz .no_gfx_key
        call echo_serial
        mov ecx, [CURSOR_X]
        cmp ecx, SCR_W - 16
        jae .no_gfx_key
        push eax
        movzx eax, al
        mov ebx, ecx
        mov ecx, 440
        mov edx, 0x0080FF80
        call draw_char
        pop eax
        add dword [CURSOR_X], 8
.no_gfx_key:
        mov eax, [TICKS]
        cmp eax, [LAST_TICK]
        je .check_end
        mov [LAST_TICK], eax
        call animate
.check_end:
        cmp byte [LIN(cfg_headless)], 0
        je .frame
        cmp dword [TICKS], 400          ; headless: four seconds in all
        jb .frame
.graphics_done:
        cmp byte [LIN(cfg_headless)], 0
        jne .finish
.idle:  hlt                             ; no framebuffer and a display: just echo keys
        call take_key
        jz .idle
        call echo_serial
        jmp .idle

; -------------------------------------------------------------------------------------
; 7. The end: the keyboard controller's command 0xFE pulses the CPU's reset line, the
;    way DOS programs rebooted a PC. morph86 runs the demo with "no reboot", so this
;    reset ends the emulator with status 0.
; -------------------------------------------------------------------------------------
.finish:
        mov esi, LIN(msg_done)
        call serial_puts
        cli
        mov al, 0xFE
        out 0x64, al
.stop:  hlt
        jmp .stop

; ---- the animation: a bouncing square and a band of moving colours ------------------
animate:
        ; Erase the square at its old place.
        mov eax, [BOX_X]
        mov ebx, [BOX_Y]
        xor edx, edx
        call fill_box
        ; Move it; bounce off the edges of the area y 48..380.
        mov eax, [BOX_X]
        add eax, [BOX_DX]
        cmp eax, 4
        jl .flipx
        cmp eax, SCR_W - 36
        jle .xok
.flipx: neg dword [BOX_DX]
        mov eax, [BOX_X]
.xok:   mov [BOX_X], eax
        mov ebx, [BOX_Y]
        add ebx, [BOX_DY]
        cmp ebx, 48
        jl .flipy
        cmp ebx, 380 - 32
        jle .yok
.flipy: neg dword [BOX_DY]
        mov ebx, [BOX_Y]
.yok:   mov [BOX_Y], ebx
        mov edx, [TICKS]
        imul edx, 0x00030507            ; a colour that changes with time
        or edx, 0x00404040
        call fill_box
        ; A band of 640x8 pixels whose colours slide left by 2 pixels a tick.
        mov edi, [LFB]
        add edi, 388 * SCR_W * 4
        mov ebx, 8
.band_row:
        xor ecx, ecx
.band_px:
        mov eax, ecx
        add eax, [TICKS]
        add eax, [TICKS]
        and eax, 0xFF
        mov edx, eax
        shl edx, 16                     ; red rises along the band, blue falls
        xor eax, 0xFF
        or eax, edx
        or eax, 0x00002000
        mov [edi + ecx * 4], eax
        inc ecx
        cmp ecx, SCR_W
        jb .band_px
        add edi, SCR_W * 4
        dec ebx
        jnz .band_row
        ret

fill_box:                               ; EAX = x, EBX = y, EDX = colour: a 32x32 square
        push edi
        imul edi, ebx, SCR_W * 4
        lea edi, [edi + eax * 4]
        add edi, [LFB]
        mov ebx, 32
.row:   push edi
        mov eax, edx
        mov ecx, 32
        rep stosd
        pop edi
        add edi, SCR_W * 4
        dec ebx
        jnz .row
        pop edi
        ret

draw_string:                            ; ESI = string, EBX = x, ECX = y, EDX = colour
        lodsb
        test al, al
        jz .done
        movzx eax, al
        push ebx
        push ecx
        call draw_char
        pop ecx
        pop ebx
        add ebx, 8
        jmp draw_string
.done:  ret

draw_char:                              ; EAX = char, EBX = x, ECX = y, EDX = colour
        pushad
        shl eax, 4
        lea esi, [FONT + eax]           ; its 16 rows of 8 dots
        imul edi, ecx, SCR_W * 4
        lea edi, [edi + ebx * 4]
        add edi, [LFB]
        mov ecx, 16
.row:   lodsb
        push ecx
        mov ecx, 8
        push edi
.dot:   xor ebx, ebx                    ; background black
        shl al, 1                       ; leftmost dot is the top bit
        jnc .put
        mov ebx, edx
.put:   mov [edi], ebx
        add edi, 4
        loop .dot
        pop edi
        pop ecx
        add edi, SCR_W * 4
        loop .row
        popad
        ret

dispi_write:                            ; AX = register index, BX = value
        mov dx, 0x1CE
        out dx, ax
        mov dx, 0x1CF
        mov ax, bx
        out dx, ax
        ret

; ---- PCI: find the VGA (vendor 0x1234, device 0x1111) and read its BAR0 --------------
; Configuration space is reached through two ports: write the address (enable bit,
; bus, device, function, register) to 0xCF8, read the data at 0xCFC.
find_lfb:
        xor ecx, ecx                    ; device number 0..31 on bus 0
.next:  mov eax, ecx
        shl eax, 11
        or eax, 0x80000000              ; enable bit; register 0 = vendor and device IDs
        mov dx, 0xCF8
        out dx, eax
        mov dx, 0xCFC
        in eax, dx
        cmp eax, 0x11111234
        je .found
        inc ecx
        cmp ecx, 32
        jb .next
        xor eax, eax
        ret
.found: mov eax, ecx
        shl eax, 11
        or eax, 0x80000010              ; register 0x10: BAR0
        mov dx, 0xCF8
        out dx, eax
        mov dx, 0xCFC
        in eax, dx
        and eax, 0xFFFFFFF0             ; low bits are type flags, not address
        ret

; ---- keyboard ------------------------------------------------------------------------
take_key:                               ; -> ZF clear and AL = ASCII if a key is waiting
        mov ecx, [KEY_TAIL]
        cmp ecx, [KEY_HEAD]
        je .none
        movzx eax, byte [KEY_RING + ecx]
        inc ecx
        and ecx, 63
        mov [KEY_TAIL], ecx
        or ecx, 1                       ; clear ZF
        ret
.none:  xor eax, eax                    ; set ZF
        ret

echo_serial:                            ; AL = key
        push esi
        push eax
        mov esi, LIN(msg_key)
        call serial_puts
        pop eax
        push eax
        call serial_putc
        mov al, 13
        call serial_putc
        mov al, 10
        call serial_putc
        pop eax
        pop esi
        ret

; ---- interrupt handlers --------------------------------------------------------------
isr_timer:
        inc dword [TICKS]
        push eax
        mov al, 0x20                    ; end of interrupt to the PIC
        out 0x20, al
        pop eax
        iretd

isr_keyboard:
        pushad
        in al, 0x60                     ; the scancode (set 1: the controller translates)
        test al, 0x80                   ; bit 7 = key released: ignore
        jnz .eoi
        movzx eax, al
        cmp eax, scancodes_end - scancodes
        jae .eoi
        mov al, [LIN(scancodes) + eax]
        test al, al
        jz .eoi
        mov ecx, [KEY_HEAD]
        mov [KEY_RING + ecx], al
        inc ecx
        and ecx, 63
        cmp ecx, [KEY_TAIL]
        je .eoi                         ; ring full: drop the key
        mov [KEY_HEAD], ecx
.eoi:   mov al, 0x20
        out 0x20, al
        popad
        iretd

isr_other_irq:
        push eax
        mov al, 0x20
        out 0xA0, al
        out 0x20, al
        pop eax
        iretd

isr_unexpected:
        mov esi, LIN(msg_unexpected)
        call serial_puts
        cli
.h:     hlt
        jmp .h

set_gate:                               ; EDI = gate, EBX = handler: a 32-bit interrupt gate
        mov eax, ebx
        mov [edi], ax                   ; offset 15:0
        mov word [edi + 2], 0x08        ; code selector
        mov word [edi + 4], 0x8E00      ; present, ring 0, 32-bit interrupt gate
        shr eax, 16
        mov [edi + 6], ax               ; offset 31:16
        ret

; ---- text and serial output ------------------------------------------------------------
text_puts:                              ; ESI = string, EDI = screen address, AH = attribute
        lodsb
        test al, al
        jz .done
        stosw
        jmp text_puts
.done:  ret

serial_puts:                            ; ESI = string
        lodsb
        test al, al
        jz .done
        call serial_putc
        jmp serial_puts
.done:  ret

serial_putc:                            ; AL = byte
        push edx
        push eax
        mov dx, COM1 + 5
.wait:  in al, dx
        test al, 0x20
        jz .wait
        pop eax
        mov dx, COM1
        out dx, al
        pop edx
        ret

; Set 1 make codes to ASCII (US layout, no shift).
scancodes:
        db 0, 27, "1234567890-=", 8, 9
        db "qwertyuiop[]", 13, 0
        db "asdfghjkl;'`", 0, "\"
        db "zxcvbnm,./", 0, "*", 0, " "
scancodes_end:

msg_pm:         db "demo: protected mode (CR0.PE=1), flat 4 GiB segments", 13, 10, 0
msg_paging:     db "demo: paging on (CR0.PG=1), timer at 100 Hz, keyboard on IRQ1", 13, 10, 0
msg_vbe:        db "demo: VBE 640x480x32 on the linear framebuffer", 13, 10, 0
msg_key:        db "demo: key ", 0
msg_done:       db "demo: done", 13, 10, 0
msg_unexpected: db "demo: unexpected exception", 13, 10, 0
txt_pm:         db "Protected mode: GDT loaded, CR0.PE set, CS = 0x08 (flat 32-bit code)", 0
txt_irq:        db "IDT loaded, PIC remapped to 0x20-0x2F, PIT at 100 Hz", 0
txt_paging:     db "Paging on: this line was written through virtual address 0xC00B8280", 0
txt_keys:       db "Type: keys are echoed below and on the serial port.", 0
gfx_title:      db "morph86 demo: Bochs VBE 640x480x32, linear framebuffer at PCI BAR0", 0
gfx_keys:       db "Keys:", 0

; -------------------------------------------------------------------------------------
; 1. Reset. After power-on the CPU starts with CS = 0xF000 but a hidden CS base of
;    0xFFFF0000 and IP = 0xFFF0: its first instruction is fetched from 0xFFFFFFF0, the
;    last 16 bytes of the 4 GiB space, where the chipset maps the top of the ROM. There
;    is room for one jump: a far jump, which also loads CS properly (base 0xF0000).
; -------------------------------------------------------------------------------------
        times 0xFFF0 - ($ - $$) db 0xFF
        bits 16                         ; the CPU is in real mode here
reset_vector:
        jmp 0xF000:start16
        times 0x10000 - ($ - $$) db 0xFF
