/* The C ABI compiles as C and reports bad arguments as a status with a message, no GPU needed. */
#include <stdio.h>
#include <string.h>

#include "kvc/c/kvc.h"

int main(void) {
  if (kvc_decode_attention(KVC_DTYPE_BF16, NULL, NULL) != KVC_ERROR_INVALID_ARGUMENT) return 1;
  if (strstr(kvc_last_error(), "args is null") == NULL) return 2;
  kvc_decode_attention_args args;
  memset(&args, 0, sizeof args);
  if (kvc_decode_attention((kvc_dtype)7, &args, NULL) != KVC_ERROR_INVALID_ARGUMENT) return 3;
  if (strstr(kvc_last_error(), "null tensor pointer") == NULL &&
      strstr(kvc_last_error(), "dtype 7") == NULL)
    return 4;
  puts("c abi smoke: ok");
  return 0;
}
