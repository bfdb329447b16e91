package waitstate

import "math/bits"

// tagHash is a seeded 64-bit hash of a tag, built like wyhash from 64×64→128
// multiplications: every byte is read, and with a random seed the table's
// slots cannot be predicted from outside. It is here rather than
// hash/maphash because Gate hashes every call and this one is cheaper for
// short tags.
func tagHash(seed uint64, s string) uint64 {
	const (
		k0 = 0xa0761d6478bd642f
		k1 = 0xe7037ed1a0b428db
		k2 = 0x8ebc6af09c88c6e3
	)
	n := len(s)
	var a, b uint64
	switch {
	case n > 16:
		for rest := s; len(rest) > 16; rest = rest[16:] {
			seed = mix64(le64(rest)^k1, le64(rest[8:])^seed)
		}
		a, b = le64(s[n-16:]), le64(s[n-8:])
	case n >= 8:
		a, b = le64(s), le64(s[n-8:])
	case n >= 4:
		a, b = le32(s), le32(s[n-4:])
	case n > 0:
		a = uint64(s[0])<<16 | uint64(s[n>>1])<<8 | uint64(s[n-1])
	}
	return mix64(a^k1^uint64(n), mix64(b^seed, k2)^k0)
}

func mix64(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

// le64 and le32 read little-endian words; the compiler turns each into a
// single load.
func le64(s string) uint64 {
	_ = s[7]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
}

func le32(s string) uint64 {
	_ = s[3]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24
}
