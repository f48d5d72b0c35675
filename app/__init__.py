"""vTPM cleanup service: removes a VM's virtual TPM from every KVM host and from the database."""
