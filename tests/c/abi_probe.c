/*
 * Prints what this machine's KVM headers say about the s390 memop ABI, one
 * "name=value" line each, for tests/test_abi.py to compare with
 * indicators/abi.py.  Only what the headers define is printed: a Linux 6.1
 * header has no cmpxchg op, an x86 <asm/kvm.h> no FLIC attributes.
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define SIZE(type) printf("sizeof(%s)=%zu\n", #type, sizeof(struct type))
#define FIELD(type, field) \
	printf("offsetof(%s.%s)=%zu\n", #type, #field, offsetof(struct type, field))
#define VALUE(name) printf("%s=%llu\n", #name, (unsigned long long)(name))

int main(void)
{
	SIZE(kvm_s390_mem_op);
	FIELD(kvm_s390_mem_op, gaddr);
	FIELD(kvm_s390_mem_op, flags);
	FIELD(kvm_s390_mem_op, size);
	FIELD(kvm_s390_mem_op, op);
	FIELD(kvm_s390_mem_op, buf);
	FIELD(kvm_s390_mem_op, ar);
	FIELD(kvm_s390_mem_op, key);
	FIELD(kvm_s390_mem_op, sida_offset);
	FIELD(kvm_s390_mem_op, reserved);
#ifdef KVM_S390_MEMOP_ABSOLUTE_CMPXCHG
	/* Linux 6.3+: the cmpxchg's old value pointer. */
	FIELD(kvm_s390_mem_op, pad1);
	FIELD(kvm_s390_mem_op, old_addr);
#endif

	SIZE(kvm_s390_interrupt);
	FIELD(kvm_s390_interrupt, type);
	FIELD(kvm_s390_interrupt, parm);
	FIELD(kvm_s390_interrupt, parm64);

	SIZE(kvm_s390_skeys);
	FIELD(kvm_s390_skeys, start_gfn);
	FIELD(kvm_s390_skeys, count);
	FIELD(kvm_s390_skeys, skeydata_addr);
	FIELD(kvm_s390_skeys, flags);
	FIELD(kvm_s390_skeys, reserved);

	SIZE(kvm_s390_irq);
	FIELD(kvm_s390_irq, type);
	FIELD(kvm_s390_irq, u);

	SIZE(kvm_device_attr);
	FIELD(kvm_device_attr, flags);
	FIELD(kvm_device_attr, group);
	FIELD(kvm_device_attr, attr);
	FIELD(kvm_device_attr, addr);

	SIZE(kvm_create_device);
	FIELD(kvm_create_device, type);
	FIELD(kvm_create_device, fd);
	FIELD(kvm_create_device, flags);

	SIZE(kvm_userspace_memory_region);
	FIELD(kvm_userspace_memory_region, slot);
	FIELD(kvm_userspace_memory_region, flags);
	FIELD(kvm_userspace_memory_region, guest_phys_addr);
	FIELD(kvm_userspace_memory_region, memory_size);
	FIELD(kvm_userspace_memory_region, userspace_addr);

#ifdef KVM_DEV_FLIC_AISM
	/* Only the s390 <asm/kvm.h> has the FLIC attributes. */
	SIZE(kvm_s390_ais_req);
	FIELD(kvm_s390_ais_req, isc);
	FIELD(kvm_s390_ais_req, mode);
	VALUE(KVM_DEV_FLIC_AISM);
	VALUE(KVM_DEV_FLIC_AIRQ_INJECT);
	VALUE(KVM_DEV_FLIC_AISM_ALL);
	VALUE(KVM_S390_ADAPTER_SUPPRESSIBLE);
	VALUE(KVM_S390_AIS_MODE_ALL);
	VALUE(KVM_S390_AIS_MODE_SINGLE);
#endif

	VALUE(KVMIO);
	VALUE(KVM_GET_API_VERSION);
	VALUE(KVM_CREATE_VM);
	VALUE(KVM_CHECK_EXTENSION);
	VALUE(KVM_SET_USER_MEMORY_REGION);
	VALUE(KVM_S390_INTERRUPT);
	VALUE(KVM_S390_MEM_OP);
	VALUE(KVM_S390_GET_SKEYS);
	VALUE(KVM_S390_SET_SKEYS);
	VALUE(KVM_S390_IRQ);
	VALUE(KVM_CREATE_DEVICE);
	VALUE(KVM_SET_DEVICE_ATTR);

	VALUE(KVM_S390_MEMOP_LOGICAL_READ);
	VALUE(KVM_S390_MEMOP_LOGICAL_WRITE);
	VALUE(KVM_S390_MEMOP_SIDA_READ);
	VALUE(KVM_S390_MEMOP_SIDA_WRITE);
	VALUE(KVM_S390_MEMOP_ABSOLUTE_READ);
	VALUE(KVM_S390_MEMOP_ABSOLUTE_WRITE);
#ifdef KVM_S390_MEMOP_ABSOLUTE_CMPXCHG
	VALUE(KVM_S390_MEMOP_ABSOLUTE_CMPXCHG);
#endif
	VALUE(KVM_S390_MEMOP_F_CHECK_ONLY);
	VALUE(KVM_S390_MEMOP_F_INJECT_EXCEPTION);
	VALUE(KVM_S390_MEMOP_F_SKEY_PROTECTION);
#ifdef KVM_S390_MEMOP_EXTENSION_CAP_BASE
	VALUE(KVM_S390_MEMOP_EXTENSION_CAP_BASE);
#endif
#ifdef KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG
	VALUE(KVM_S390_MEMOP_EXTENSION_CAP_CMPXCHG);
#endif

	VALUE(KVM_CAP_S390_MEM_OP);
	VALUE(KVM_CAP_S390_SKEYS);
	VALUE(KVM_CAP_S390_AIS);
#ifdef KVM_CAP_S390_MEM_OP_EXTENSION
	VALUE(KVM_CAP_S390_MEM_OP_EXTENSION);
#endif
	VALUE(KVM_S390_GET_SKEYS_NONE);
	VALUE(KVM_S390_SKEYS_MAX);
	VALUE(KVM_DEV_TYPE_FLIC);
	VALUE(KVM_S390_INT_IO_AI_MASK);
	VALUE(KVM_S390_INT_IO(1, 0, 0, 0));
	VALUE(KVM_S390_INT_IO(0, 3, 2, 0x1234));
	return 0;
}
